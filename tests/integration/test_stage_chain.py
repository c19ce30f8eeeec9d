"""The stages chained on a real cohort: `finetune` and `cka` take a tagged encoder's weights and the
device from the config (the CLI, `histotransfer run` and the KFP steps share one wiring), and each stage
writes only inside its own part of the study layout and reuses its results on a second pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from histotransfer import stages
from histotransfer.core.config import StudyConfig, validate_config
from histotransfer.io.layout import StudyLayout
from tests.helpers import EASY_COHORT


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
    from histotransfer.io.lineage import read_record

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
        from histotransfer.io.manifest import read_manifest

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
