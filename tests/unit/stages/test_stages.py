"""The study layout and the stage functions: every path comes from StudyLayout, and the CLI, `histotransfer
run` and the KFP steps share one wiring (the slides that go on, the config's checks, merging shards).
The stages chained on a real cohort (each writes only inside its own part of the layout; the weights
and device `finetune` and `cka` get): tests/integration/test_stage_chain.py."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from histotransfer.core.config import validate_config
from histotransfer.core.errors import LayoutError
from histotransfer.io.layout import SECTIONS, StudyLayout, slide_file
from histotransfer.stages import common
from tests.helpers import write_csv

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
    from histotransfer.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"not among extraction\.encoders"):
        validate_config({"finetune": {"encoders": ["resnet18"]}}, "test")


def test_merging_shards_publishes_the_summary_atomically(tmp_path, monkeypatch):
    """Regression: a merge that died while writing summary.csv left a truncated file behind."""
    from histotransfer.io import atomic
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
