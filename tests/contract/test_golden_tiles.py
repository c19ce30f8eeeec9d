"""Golden tiles: a synthetic slide of known geometry (tests.helpers.GOLDEN_*) tiles to exactly the
tissue block's tiles, with the coordinates and attributes CLAM reads, at both pyramid layouts."""

import h5py
import numpy as np
import openslide
import pytest

from histotransfer.core.config import TilingConfig
from histotransfer.io.manifest import read_manifest
from histotransfer.wsi.svs import write_aperio_svs
from histotransfer.wsi.tiling import tile_cohort
from tests.helpers import (
    GOLDEN_MPP,
    GOLDEN_SIZE,
    GOLDEN_TILES,
    GOLDEN_TISSUE,
    synthetic_slide_rgb,
    tiles_summary,
    write_csv,
)


@pytest.mark.parametrize(("downsamples", "read_level", "read_size"), [((2, 8), 1, 224), ((4, 16), 0, 448)])
def test_golden_slide_coords(tmp_path, downsamples, read_level, read_size):
    """224 px at 0.5 um/px on a 0.25 um/px slide: 448 px footprints, exactly the tissue block's tiles."""
    rgb = synthetic_slide_rgb(GOLDEN_SIZE, [GOLDEN_TISSUE])
    slide = write_aperio_svs(tmp_path / "golden.svs", rgb, mpp=GOLDEN_MPP, downsamples=downsamples)
    manifest = write_csv(tmp_path / "m.csv", [{"slide_id": "golden", "path": str(slide), "label": "x"}])
    result = tile_cohort(read_manifest(manifest), out_dir=tmp_path / "tiles", tiling=TilingConfig())
    assert not result.failed
    with h5py.File(tmp_path / "tiles" / "golden.h5", "r") as f:
        coords = f["coords"]
        assert coords.dtype == np.int64
        assert [tuple(c) for c in coords[:]] == GOLDEN_TILES
        attrs = dict(coords.attrs)
        assert (attrs["patch_level"], attrs["read_level"], attrs["patch_size"]) == (
            read_level,
            read_level,
            read_size,
        )
        assert (attrs["patch_size_level0"], attrs["patch_size_px"]) == (448, 224)
        assert (attrs["target_mpp"], attrs["slide_mpp"]) == (0.5, pytest.approx(GOLDEN_MPP))
        assert f["tissue_fraction"].shape == (16,)
        assert (f["tissue_fraction"][:] > 0.9).all()
        assert f.attrs["slide_id"] == "golden"
    # CLAM reads `patch_size` px at `patch_level` from each coordinate: that must be all tissue.
    with openslide.OpenSlide(str(slide)) as wsi:
        for x, y in GOLDEN_TILES[::5]:
            tile = np.asarray(
                wsi.read_region((int(x), int(y)), read_level, (read_size, read_size)).convert("RGB")
            )
            assert tile.shape == (read_size, read_size, 3)
            assert (tile.max(axis=2).astype(int) - tile.min(axis=2)).mean() > 40  # saturated: tissue
    assert (tmp_path / "tiles" / "golden.png").is_file()
    assert tiles_summary(tmp_path / "tiles")["golden"]["n_tiles"] == "16"
