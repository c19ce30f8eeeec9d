import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from histotransfer.cli import main
from histotransfer.core.config import TilingConfig
from histotransfer.io.assets import fetch_asset
from histotransfer.io.manifest import read_manifest
from histotransfer.io.provenance import sha256_file
from histotransfer.wsi.geometry import tile_geometry
from histotransfer.wsi.svs import write_aperio_svs
from histotransfer.wsi.tiling import TissueMask, load_tiles, select_tiles, tile_cohort
from tests.helpers import (
    GOLDEN_MPP,
    GOLDEN_SIZE,
    GOLDEN_TISSUE,
    synthetic_slide_rgb,
    tiles_summary,
    write_csv,
)


def test_sample_cohort_tiles_are_tissue(sample_cohort, tmp_path):
    records = read_manifest(sample_cohort)
    result = tile_cohort(records, out_dir=tmp_path, tiling=TilingConfig())
    assert [o.status for o in result.outcomes] == ["done"] * len(records)
    for record in records:
        with h5py.File(tmp_path / f"{record.slide_id}.h5", "r") as f:
            assert len(f["coords"]) > 20
            assert (f["tissue_fraction"][:] >= 0.5).all()
            assert f.attrs["config_hash"]


@pytest.mark.parametrize(
    ("od_ratio", "sat_ratio", "dropped"),
    [(2.2, 1.5, {0, 2}), (1.5, 1.5, {0, 1, 2}), (2.2, None, {0}), (None, 1.5, {2}), (None, None, set())],
    ids=["defaults", "strict", "od only", "saturation only", "off"],
)
def test_tiles_far_darker_or_more_saturated_than_the_slide_are_dropped(od_ratio, sat_ratio, dropped):
    """A fold doubles the tissue it covers: tiles whose mean optical density or saturation is far
    above the slide's median tissue tile go, whatever their tissue fraction."""
    geometry = tile_geometry(
        slide_mpp=0.5, level_downsamples=(1.0,), target_mpp=0.5, patch_size_px=64, overlap=0, tolerance=0.1
    )
    tissue = np.ones((40, 40), dtype=bool)
    od = np.full((40, 40), 0.5, dtype=np.float32)
    sat = np.full((40, 40), 80, dtype=np.uint8)
    od[:8, :8] = 1.2  # row 0 of column 0: 2.4x the median optical density
    od[8:16, :8] = 0.9  # row 1: 1.8x
    sat[16:24, :8] = 140  # row 2: 1.75x the median saturation
    mask = TissueMask(tissue, np.zeros_like(tissue), od, sat, (8.0, 8.0))
    candidates = np.array([(x, y) for y in range(0, 320, 64) for x in range(0, 320, 64)])
    config = TilingConfig(max_od_ratio=od_ratio, max_saturation_ratio=sat_ratio)
    keep, fractions, qc = select_tiles(mask, candidates, geometry, config)
    assert set(np.flatnonzero(qc).tolist()) == {5 * row for row in dropped}  # tile k of column 0: 5k
    assert (keep == ~qc).all()
    assert (fractions == 1.0).all()


def test_resume_skips_and_overwrite_redoes(sample_cohort, tmp_path):
    records = read_manifest(sample_cohort)
    tile_cohort(records, out_dir=tmp_path, tiling=TilingConfig())
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5")}
    again = tile_cohort(records, out_dir=tmp_path, tiling=TilingConfig())
    assert {o.status for o in again.outcomes} == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5")} == mtimes
    # stats of skipped outputs
    assert all(int(row["n_tiles"]) > 0 for row in tiles_summary(tmp_path).values())
    redone = tile_cohort(records, out_dir=tmp_path, tiling=TilingConfig(), overwrite=True)
    assert {o.status for o in redone.outcomes} == {"done"}
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in tmp_path.glob("*.h5"))
    changed = tile_cohort(records, out_dir=tmp_path, tiling=TilingConfig(min_tissue_fraction=0.8))
    assert {o.status for o in changed.outcomes} == {"done"}  # other parameters: not current


@pytest.fixture
def bad_cohort(sample_cohort, tmp_path):
    """Two good slides and every kind of bad one; returns (manifest, {slide_id: expected reason})."""
    blank = write_aperio_svs(tmp_path / "blank.svs", synthetic_slide_rgb((2000, 1500)), mpp=0.5)
    tiny = write_aperio_svs(
        tmp_path / "tiny.svs", synthetic_slide_rgb((200, 150), [(0, 0, 200, 150)]), mpp=0.5
    )
    good = read_manifest(sample_cohort)[:2]
    rows = [{"slide_id": r.slide_id, "path": r.path, "label": r.label} for r in good]
    boxes_copy = shutil.copy(fetch_asset("no_mpp_tiff"), tmp_path / "boxes.tiff")  # a file has one id
    bad = {
        "unreadable": (fetch_asset("unreadable_svs"), "", "OpenSlide failed while reading pixels"),
        "unopenable": (fetch_asset("unopenable_tiff"), "", "OpenSlide cannot read this file"),
        "no-mpp": (
            fetch_asset("no_mpp_tiff"),
            "",
            "implausible resolution (352.778 um/px); add an `mpp` column",
        ),
        "tiny-with-mpp": (boxes_copy, "0.25", "smaller than one tile"),
        "blank": (blank, "", "no tissue found"),
        "tiny": (tiny, "", "smaller than one tile"),
    }
    rows += [{"slide_id": k, "path": str(p), "label": "x", "mpp": mpp} for k, (p, mpp, _) in bad.items()]
    return write_csv(tmp_path / "m.csv", rows), {k: why for k, (_, _, why) in bad.items()}


def test_bad_slides_fail_alone_and_lose_nothing(bad_cohort, tmp_path, capsys):
    manifest, reasons = bad_cohort
    inputs = {r.path: sha256_file(r.path) for r in read_manifest(manifest)}
    out = tmp_path / "tiles"
    assert main(["tile", str(manifest), "--out", str(out)]) == 1
    summary = tiles_summary(out)
    for slide_id, why in reasons.items():
        assert summary[slide_id]["status"] == "failed"
        assert why in summary[slide_id]["reason"], summary[slide_id]["reason"]
        assert not (out / f"{slide_id}.h5").exists()
    good = [k for k in summary if k not in reasons]
    assert len(good) == 2
    assert all(summary[k]["status"] == "done" for k in good)
    err = capsys.readouterr().err
    assert f"{len(reasons)} of {len(summary)} slide(s) failed" in err
    assert all(slide_id in err for slide_id in reasons)
    assert {r.path: sha256_file(r.path) for r in read_manifest(manifest)} == inputs
    assert not list(out.glob("*.partial"))  # no temporary leftovers


KILL_SCRIPT = """
import os, sys
import h5py
from histotransfer.cli import main

create = h5py.Group.create_dataset
def die_mid_write(self, name, *args, **kwargs):
    if name == "tissue_fraction":  # coords already written: the file is half done
        os._exit(9)
    return create(self, name, *args, **kwargs)
h5py.Group.create_dataset = die_mid_write
main(["tile", sys.argv[1], "--out", sys.argv[2]])
"""


def test_killed_run_leaves_no_half_file_and_rerun_finishes(sample_cohort, tmp_path):
    out = tmp_path / "tiles"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(sample_cohort), str(out)], check=False)
    assert proc.returncode == 9
    assert not list(out.glob("*.h5"))
    assert len(list(out.glob(".sample-000.h5.*.partial"))) == 1  # the half file never got its final name
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == 0
    assert len(list(out.glob("*.h5"))) == 4
    assert not list(out.glob("*.partial"))
    with h5py.File(out / "sample-000.h5", "r") as f:
        assert f["coords"].shape[0] == f["tissue_fraction"].shape[0] > 0


def test_qc_picture_is_the_mask_level_with_tiles_drawn_and_can_be_switched_off(tmp_path):
    """The QC picture comes from the mask's own read (no second read of the slide), at most
    qc_max_side_px, tissue outlined in green and kept tiles in blue; qc_image=false writes none and
    leaves the tiles and their config hash as they were."""
    rgb = synthetic_slide_rgb(GOLDEN_SIZE, [GOLDEN_TISSUE])
    slide = write_aperio_svs(tmp_path / "golden.svs", rgb, mpp=GOLDEN_MPP, downsamples=(4, 16))
    manifest = write_csv(tmp_path / "m.csv", [{"slide_id": "golden", "path": str(slide), "label": "x"}])
    records = read_manifest(manifest)
    tile_cohort(records, out_dir=tmp_path / "qc", tiling=TilingConfig(qc_max_side_px=100))
    qc = np.asarray(Image.open(tmp_path / "qc" / "golden.png"))
    assert max(qc.shape[:2]) <= 100
    assert ((qc == (30, 60, 220)).all(axis=2)).sum() > 50  # kept tiles' outlines
    assert ((qc == (0, 170, 0)).all(axis=2)).sum() > 20  # the tissue outline
    off_config = TilingConfig(qc_max_side_px=100, qc_image=False)
    tile_cohort(records, out_dir=tmp_path / "off", tiling=off_config)
    assert not (tmp_path / "off" / "golden.png").exists()
    on, off = load_tiles(tmp_path / "qc" / "golden.h5"), load_tiles(tmp_path / "off" / "golden.h5")
    assert np.array_equal(on.coords, off.coords)
    assert on.config_hash == off.config_hash  # the switch changes no tile: no re-tiling, no re-extraction
