import numpy as np
import pytest

from histotransfer.wsi.geometry import (
    GeometryError,
    grid_coords,
    select_level,
    tile_geometry,
    tissue_fractions,
)

PYRAMID = (1.0, 4.0, 16.0)


@pytest.mark.parametrize(
    ("slide_mpp", "downsamples", "target_mpp", "level", "downsample"),
    [
        (0.25, PYRAMID, 0.5, 0, 1.0),  # 40x scan, 1x/4x/16x: read level 0, downscale 2x
        (0.25, (1.0, 2.0, 8.0), 0.5, 1, 2.0),  # a 2x level serves 0.5 um/px exactly
        (0.25, PYRAMID, 1.0, 1, 4.0),
        (0.25, PYRAMID, 4.0, 2, 16.0),
        (0.25, PYRAMID, 2.0, 1, 4.0),  # never a level coarser than the target
        (0.5, PYRAMID, 0.5, 0, 1.0),
        (0.499, PYRAMID, 0.5, 0, 1.0),
        (0.26, (1.0, 4.0000734, 16.0003), 1.1, 1, 4.0000734),  # within 10% tolerance of 1.1
        (0.55, PYRAMID, 0.5, 0, 1.0),  # 10% coarser than the target: tolerated
    ],
)
def test_select_level(slide_mpp, downsamples, target_mpp, level, downsample):
    choice = select_level(slide_mpp=slide_mpp, level_downsamples=downsamples, target_mpp=target_mpp)
    assert choice.read_level == level
    assert choice.read_downsample == pytest.approx(downsample)
    assert choice.level_mpp == pytest.approx(slide_mpp * downsample)


def test_select_level_refuses_upsampling():
    with pytest.raises(GeometryError, match=r"coarser than the target 0.25"):
        select_level(slide_mpp=0.5, level_downsamples=PYRAMID, target_mpp=0.25)


@pytest.mark.parametrize(
    ("slide_mpp", "downsamples", "patch", "overlap", "size_lv0", "stride_lv0", "read_size"),
    [
        (0.25, PYRAMID, 224, 0.0, 448, 448, 448),
        (0.25, (1.0, 2.0, 8.0), 224, 0.0, 448, 448, 224),
        (0.5, PYRAMID, 224, 0.5, 224, 112, 224),
        (0.25, PYRAMID, 512, 0.25, 1024, 768, 1024),
    ],
)
def test_tile_geometry(slide_mpp, downsamples, patch, overlap, size_lv0, stride_lv0, read_size):
    geo = tile_geometry(
        slide_mpp=slide_mpp,
        level_downsamples=downsamples,
        target_mpp=0.5,
        patch_size_px=patch,
        overlap=overlap,
    )
    assert (geo.patch_size_level0, geo.stride_level0, geo.read_size_px) == (size_lv0, stride_lv0, read_size)


def test_tile_geometry_rejects_bad_overlap():
    with pytest.raises(GeometryError, match="overlap"):
        tile_geometry(
            slide_mpp=0.5, level_downsamples=PYRAMID, target_mpp=0.5, patch_size_px=224, overlap=1.0
        )


def test_grid_coords_full_tiles_row_major():
    coords = grid_coords(width_lv0=1000, height_lv0=500, patch_size_lv0=448, stride_lv0=448)
    assert coords.dtype == np.int64
    assert coords.tolist() == [[0, 0], [448, 0]]  # a third column or second row would overhang
    coords = grid_coords(width_lv0=1000, height_lv0=1000, patch_size_lv0=448, stride_lv0=224)
    assert coords.tolist()[:4] == [[0, 0], [224, 0], [448, 0], [0, 224]]
    assert len(coords) == 9


def test_grid_coords_tiny_slide_is_an_error():
    with pytest.raises(GeometryError, match="smaller than one tile"):
        grid_coords(width_lv0=300, height_lv0=2000, patch_size_lv0=448, stride_lv0=448)


def test_tissue_fractions_exact_on_aligned_mask():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 0:2] = True  # left half of the top-left 4x4 block
    coords = np.array([[0, 0], [64, 0], [0, 64], [32, 32]])
    got = tissue_fractions(mask, mask_downsample=(16.0, 16.0), coords_lv0=coords, patch_size_lv0=64)
    np.testing.assert_allclose(got, [0.5, 0.0, 0.0, 0.0])
    assert got.dtype == np.float32


def test_tissue_fractions_subpixel_tile_uses_one_mask_pixel():
    mask = np.array([[True, False], [False, False]])
    got = tissue_fractions(
        mask, mask_downsample=(100.0, 100.0), coords_lv0=np.array([[10, 10], [110, 10]]), patch_size_lv0=20
    )
    np.testing.assert_allclose(got, [1.0, 0.0])
