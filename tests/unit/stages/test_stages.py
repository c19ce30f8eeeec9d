"""The study layout and the stage functions: every path comes from StudyLayout, every stage writes only
inside its own part of it, and the CLI, `histotransfer run` and the KFP steps share one wiring (the
weights an encoder id gets, the device, the slides that go on)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from histotransfer import stages
from histotransfer.config import StudyConfig, validate_config
from histotransfer.errors import LayoutError
from histotransfer.layout import SECTIONS, StudyLayout, slide_file
from histotransfer.stages import common
from tests.helpers import EASY_COHORT, write_csv

# ---------------------------------------------------------------------------------------------- layout


def test_a_study_layout_puts_every_section_under_its_root(tmp_path):
    layout = StudyLayout.at(tmp_path / "study")
    assert [getattr(layout, s) for s in SECTIONS if s != "cohort"] == [
        tmp_path / "study" / s for s in SECTIONS if s != "cohort"
    ]
    assert layout.manifest == tmp_path / "study" / "cohort" / "manifest.csv"
    assert layout.tiles_file("s1") == tmp_path / "study" / "tiles" / "s1.h5"
    assert layout.features_file("resnet18@layer3+ft", "s1", fold=2) == (
        tmp_path / "study" / "features" / "resnet18@layer3+ft" / "fold2" / "s1.h5"
    )
    mil = layout.mil_result("resnet18")
    assert (mil.fold_model(0), mil.metrics) == (mil.dir / "fold0" / "model.pt", mil.dir / "metrics.json")
    assert (
        layout.finetune_fold("resnet18", 1).encoder == tmp_path / "study/finetune/resnet18/fold1/encoder.pt"
    )
    assert layout.cka_files("a", "a+ft-fold1")[0] == tmp_path / "study" / "cka" / "a__a+ft-fold1.json"
    assert layout.tracking_metrics == tmp_path / "study" / "metrics.json"
    mine = StudyLayout.at(tmp_path / "study", manifest=tmp_path / "mine" / "cohort.csv")
    assert (mine.manifest, mine.cohort) == (tmp_path / "mine" / "cohort.csv", tmp_path / "mine")


def test_a_command_layout_has_only_the_folders_it_was_given(tmp_path):
    layout = StudyLayout.of(manifest=tmp_path / "m.csv", tiles=tmp_path / "t")
    assert layout.tiles == tmp_path / "t"
    assert layout.has("tiles")
    assert not layout.has("features")
    with pytest.raises(LayoutError, match="no features folder"):
        layout.features_dir("resnet18")
    with pytest.raises(ValueError, match="unknown section"):
        layout.replace(tile=tmp_path)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden"])
def test_unchecked_ids_never_become_paths(tmp_path, bad):
    layout = StudyLayout.at(tmp_path)
    with pytest.raises(ValueError):  # noqa: PT011 - the message differs per id, the refusal does not
        slide_file(layout.tiles, bad)
    if bad != ".hidden":
        with pytest.raises(ValueError, match="cannot name a folder"):
            layout.features_dir(bad)


# ------------------------------------------------------------------------------ one wiring, fixed bugs


@pytest.mark.integration
def test_finetune_and_cka_take_a_tagged_encoders_weights_from_the_config(
    tmp_path, sample_cohort, monkeypatch
):
    """Regression: `finetune` and `cka` built a tagged id without the config's weights (so a DVC study
    with densenet121+kimianet failed there), and `cka` ran on the CPU whatever extraction.device said.
    The config names the weights (as params.yaml does under DVC); no command is given them."""
    import histotransfer.cka.layers as cka_stage
    from histotransfer.cka.layers import CKAResult
    from histotransfer.cli import main
    from histotransfer.features.encoders import build_encoder
    from histotransfer.lineage import read_record

    encoder_id = "resnet18@layer1+mine"
    weights = tmp_path / "mine.pt"
    torch.save(build_encoder("resnet18@layer1+random").module.model.state_dict(), weights)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"extraction:\n  encoders: [{{id: {encoder_id}, weights: {weights}}}]\n  num_workers: 0\n"
        f"finetune: {{encoders: [{encoder_id}], k: 2, epochs: 1}}\n"
        "cka: {fold: 0, tiles: 8, batch_size: 4}\n"
        "mil: {epochs: 1, folds: 2, restarts: 1}\nevaluation: {bootstrap: 100, heatmaps: 0}\n"
    )
    study = tmp_path / "study"
    m, c = str(sample_cohort), ["--config", str(config)]
    assert main(["tile", m, "--out", str(study / "tiles"), *c]) == 0
    extract = ["extract", m, "--tiles", str(study / "tiles"), "--encoder", encoder_id, *c]
    assert main([*extract, "--out", str(study / "features")]) == 0
    features = str(study / "features" / encoder_id)
    train = ["train", m, "--features", features, "--tiles", str(study / "tiles"), "--out", str(study / "mil")]
    assert main([*train, *c]) == 0
    common = [m, "--study", str(study), "--encoder", encoder_id, *c]
    assert main(["finetune", *common]) == 0
    history = read_record(study / "finetune" / encoder_id / "fold0" / "history.json", "finetune")
    assert history["frozen"]["encoder"]["weights_source"].startswith("file:mine.pt")
    seen = {}

    def fake_compare(a, b, tiles, *, batch_size, device):
        seen["cka"] = (a.weights_source, b.id.tag, device)
        return CKAResult(np.eye(1), ["layer1"], ["layer1"], 8)

    monkeypatch.setattr(cka_stage, "layer_cka", fake_compare)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # extraction.device auto -> cuda
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["cka", *common]) == 0
    assert seen["cka"][1:] == ("mine+ft", "cuda")  # the config's device, not the CPU
    assert seen["cka"][0].startswith("file:mine.pt")
    assert json.loads((study / "cka" / f"{encoder_id}__{encoder_id}+ft-fold0.json").read_text())["b"] == (
        f"{encoder_id}+ft-fold0"
    )


def test_slides_a_stage_recorded_as_failed_do_not_go_on(tmp_path):
    layout = StudyLayout.at(tmp_path)
    layout.tiles.mkdir(parents=True)
    rows = [
        {"slide_id": "a", "status": "done", "reason": ""},
        {"slide_id": "b", "status": "failed", "reason": "SlideError: unreadable"},
        {"slide_id": "c", "status": "skipped", "reason": ""},
    ]
    write_csv(layout.tiles / "summary.csv", rows)
    records = [SimpleNamespace(slide_id=s) for s in "abcd"]
    assert [r.slide_id for r in common.tiled(layout, records)] == ["a", "c", "d"]
    assert [r.slide_id for r in common.tiled(StudyLayout.of(), records)] == ["a", "b", "c", "d"]


def test_finetuning_an_encoder_that_is_not_extracted_is_a_config_error():
    from histotransfer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"not among extraction\.encoders"):
        validate_config({"finetune": {"encoders": ["resnet18"]}}, "test")


def test_merging_shards_publishes_the_summary_atomically(tmp_path, monkeypatch):
    """Regression: a merge that died while writing summary.csv left a truncated file behind."""
    from histotransfer import atomic
    from histotransfer.stages.adapter import merge

    parts = []
    for shard, slides in enumerate((["a", "c"], ["b"])):
        part = tmp_path / f"part{shard}" / "tiles"
        part.mkdir(parents=True)
        rows = [{"slide_id": s, "status": "done", "reason": ""} for s in slides]
        write_csv(part / f"summary-shard{shard}.csv", rows)
        (part / f"{slides[0]}.h5").write_bytes(b"x")
        parts.append(part.parent)
    out = tmp_path / "merged"
    (out / "tiles").mkdir(parents=True)
    (out / "tiles" / "summary.csv").write_text("slide_id,status,reason,seconds\nold,done,,0.1\n")

    def crash(*args):
        raise OSError("killed while publishing")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        merge(parts, out)
    assert (out / "tiles" / "summary.csv").read_text() == "slide_id,status,reason,seconds\nold,done,,0.1\n"
    assert not list((out / "tiles").glob("*.partial*"))
    monkeypatch.undo()
    merge(parts, tmp_path / "again")
    with (tmp_path / "again" / "tiles" / "summary.csv").open() as f:
        assert [row["slide_id"] for row in csv.DictReader(f)] == ["a", "b", "c"]


# ------------------------------------------------------------------- each stage in its part of the layout

MINI = {
    "sample_data": {"n_slides": 4, "seed": 7, **EASY_COHORT},
    "extraction": {"encoders": [{"id": "resnet18@layer1+random"}], "num_workers": 0},
    "mil": {"epochs": 2, "folds": 2, "restarts": 1},
    "finetune": {"encoders": ["resnet18@layer1+random"], "k": 2, "epochs": 1},
    "cka": {"tiles": 8, "batch_size": 4, "fold": 0},
    "evaluation": {"bootstrap": 100, "heatmaps": 1},
}


def _snapshot(root: Path) -> dict[str, float]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.integration
def test_each_stage_writes_only_inside_its_own_part_of_the_layout(tmp_path):
    config: StudyConfig = validate_config({**MINI, "output_dir": str(tmp_path / "study")}, "test")
    layout = StudyLayout.at(config.output_dir)
    encoder, tuned = "resnet18@layer1+random", "resnet18@layer1+random+ft"
    steps = [
        ("cohort", lambda: stages.cohort(layout, config), {"cohort/"}),
        ("tile", lambda: stages.tile(layout, config, records()), {"tiles/"}),
        ("extract", lambda: stages.extract(layout, config, records(), encoder), {f"features/{encoder}/"}),
        ("train", lambda: stages.train(layout, config, records(), encoder), {f"mil/{encoder}/"}),
        (
            "finetune",
            lambda: stages.finetune(layout, config, records(), encoder),
            {f"finetune/{encoder}/", f"features/{tuned}/", f"mil/{tuned}/"},
        ),
        ("cka", lambda: stages.cka(layout, config, records(), encoder), {f"cka/{encoder}__{tuned}-fold0."}),
        ("export", lambda: stages.export(layout, config), {"onnx/best/"}),
        ("report", lambda: stages.report(layout, tracking=True), {"report/", "metrics.json", "plots/"}),
    ]

    def records():
        from histotransfer.manifest import read_manifest

        return read_manifest(layout.manifest)

    root = layout.root
    root.mkdir(parents=True)
    for name, run, allowed in steps:
        before = _snapshot(root)
        run()
        after = _snapshot(root)
        changed = {p for p, t in after.items() if before.get(p) != t}
        assert changed, f"stage {name} wrote nothing"
        outside = sorted(p for p in changed if not any(p.startswith(a) for a in allowed))
        assert outside == [], f"stage {name} wrote outside {sorted(allowed)}: {outside}"
        assert not [p for p in after if ".partial" in p]
    # a second pass reuses every result: only the per-slide summaries and the report are rewritten
    before = _snapshot(root)
    for _, run, _ in steps:
        run()
    rewritten = {p for p, t in _snapshot(root).items() if before.get(p) != t}
    kept_or_cheap = ("report/", "plots/", "metrics.json", "cka/")  # CKA is recomputed: it has no resume
    assert (
        sorted(p for p in rewritten if not p.endswith("summary.csv") and not p.startswith(kept_or_cheap))
        == []
    )
    assert os.path.isfile(layout.bundle("best") / "bundle.json")
