"""The orchestrators' side of the stages, fast: the generic adapter (stages.adapter.run_stage) that every
KFP component calls, and the one fan-out rule (stages.fanout) that run, KFP and DVC share."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from histotransfer.core.errors import ConfigError, FanOutError, FeaturesError
from histotransfer.io.layout import SUMMARY
from histotransfer.io.manifest import read_manifest
from histotransfer.stages import adapter
from histotransfer.stages.fanout import fan_out

# ---- one failure rule -------------------------------------------------------------------------------


def test_a_failing_item_is_recorded_and_the_others_go_on():
    def stage(item: str) -> str:
        if item == "b":
            raise FeaturesError("no features for b")
        return item.upper()

    done = fan_out(["a", "b", "c"], stage, what="mil")
    assert done.results == {"a": "A", "c": "C"}
    assert done.errors == {"b (mil)": "FeaturesError: no features for b"}
    assert done.check() is done  # some finished: the stage as a whole did not fail


def test_when_every_item_fails_the_stage_fails_naming_each():
    def stage(item: str) -> str:
        raise FeaturesError(f"broken {item}")

    done = fan_out(["a", "b"], stage, what="cka")
    with pytest.raises(FanOutError, match=r"a \(cka\): FeaturesError: broken a; b \(cka\)"):
        done.check()
    assert fan_out([], stage, what="cka").check().results == {}  # nothing to do is not a failure


def test_a_bug_is_not_swallowed_as_one_encoders_failure():
    def stage(item: str) -> str:
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        fan_out(["a"], stage, what="mil")


# ---- the generic adapter ------------------------------------------------------------------------------


def test_an_unknown_stage_or_section_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'tiles'; the stages run on artifacts: cohort, tile"):
        adapter.run_stage("tiles", [], tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown config section"):
        adapter.run_stage("tile", [], tmp_path / "out", sections={"tilling": {}})
    assert not (tmp_path / "out").exists()


def test_the_cohort_step_copies_a_users_manifest_with_absolute_paths(sample_cohort, tmp_path):
    """KFP's make_cohort and DVC's cohort stage: the user's rows, slide paths made absolute (the copy
    moves), the user's folder untouched, no sample cohort built."""
    own = tmp_path / "own"
    own.mkdir()
    rows = list(csv.DictReader(sample_cohort.open()))
    for row in rows:
        shutil.copy(sample_cohort.parent / row["path"], own / Path(row["path"]).name)
        row["path"] = Path(row["path"]).name  # relative to the user's manifest
    with (own / "cohort.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = sorted(p.name for p in own.iterdir())
    stats = adapter.run_stage("cohort", [], tmp_path / "artifact", manifest=str(own / "cohort.csv"))
    assert stats == {"n_slides": 4, "labels": ["normal", "tumor"]}
    copied = read_manifest(tmp_path / "artifact" / "cohort" / "manifest.csv")
    assert [r.slide_id for r in copied] == [r["slide_id"] for r in rows]
    assert all(Path(r.path).is_absolute() and Path(r.path).parent == own for r in copied)
    assert sorted(p.name for p in own.iterdir()) == before
    assert not (tmp_path / "artifact" / "cohort" / "slides").exists()


def test_a_tile_shard_tiles_its_slides_only_with_a_summary_of_its_own(sample_cohort, tmp_path):
    adapter.run_stage("cohort", [], tmp_path / "cohort", manifest=str(sample_cohort))
    items, extraction, encoders = adapter.plan(tmp_path / "cohort", shards=3)
    assert items == [{"shard": i, "shards": 3} for i in range(3)]
    assert all("weights" not in e for e in extraction)  # no "" standing for "not set"
    assert len(extraction) == 3 * len(encoders)
    out = tmp_path / "tiles-1"
    small = {"target_mpp": 1.0, "patch_size_px": 64, "qc_image": False}
    stats = adapter.run_stage("tile", [tmp_path / "cohort"], out, sections={"tiling": small}, item=items[1])
    records = read_manifest(tmp_path / "cohort" / "cohort" / "manifest.csv")
    shard = [r.slide_id for r in records[1::3]]
    assert stats == {"slides": len(shard), "failed": 0}
    assert sorted(p.stem for p in (out / "tiles").glob("*.h5")) == sorted(shard)
    assert not (out / "tiles" / SUMMARY).exists()  # merge_shards makes one summary from the shards'
    assert [p.name for p in (out / "tiles").glob("summary-shard*.csv")] == ["summary-shard1.csv"]
    assert not (tmp_path / "cohort" / "tiles").exists()  # inputs are never written to


def test_the_first_failure_is_kept_to_be_raised_when_nothing_finished():
    def stage(item: str) -> str:
        raise FeaturesError(f"broken {item}")

    done = fan_out(["a", "b"], stage, what="mil")
    assert isinstance(done.first, FeaturesError)
    assert str(done.first) == "broken a"
