"""Tile geometry, defined once: read level for a target mpp, the tile grid, tissue fraction per tile.

All coordinates are level-0 pixels (``x_lv0``, ``y_lv0``) of the top-left corner, as in CLAM.
See docs/adr/0001-tile-geometry.md for the level-choice rule and its tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histotransfer.core.errors import GeometryError


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level tiles are read from."""

    read_level: int
    read_downsample: float  # level-0 px per read-level px
    level_mpp: float  # microns per pixel of the read level


@dataclass(frozen=True)
class TileGeometry:
    """Everything needed to place and read one tile of ``patch_size_px`` at ``target_mpp``."""

    target_mpp: float
    patch_size_px: int  # side of the output tile, at target_mpp
    slide_mpp: float  # level-0 microns per pixel
    patch_size_level0: int  # side of the tile's footprint in level-0 px
    stride_level0: int
    read_level: int
    read_downsample: float
    read_size_px: int  # side of the region read at read_level (resized to patch_size_px)


def select_level(
    *,
    slide_mpp: float,
    level_downsamples: Sequence[float],
    target_mpp: float,
    tolerance: float = 0.1,
) -> LevelChoice:
    """The coarsest level whose mpp is no coarser than ``target_mpp * (1 + tolerance)``.

    Tiles are then downsampled from that level (never upsampled beyond the tolerance). A slide whose
    finest level is coarser than that bound cannot serve the target resolution.
    """
    if not (slide_mpp > 0 and target_mpp > 0 and math.isfinite(slide_mpp) and math.isfinite(target_mpp)):
        raise GeometryError(
            f"um/px must be positive and finite, got slide {slide_mpp:g} and target {target_mpp:g}"
        )
    bound = target_mpp * (1 + tolerance)
    if slide_mpp > bound:
        raise GeometryError(
            f"slide resolution {slide_mpp:g} um/px is coarser than the target {target_mpp:g} um/px "
            f"allows (up to {bound:g} with the {tolerance:.0%} tolerance), and tiles are never "
            f"upsampled: choose a target_mpp of at least {min_target_mpp(slide_mpp, tolerance):g} um/px "
            "(the slide's own, within the tolerance) for this slide, or a scan at a higher magnification"
        )
    best = 0
    for level, downsample in enumerate(level_downsamples):
        if slide_mpp * downsample <= bound and downsample > level_downsamples[best]:
            best = level
    downsample = float(level_downsamples[best])
    return LevelChoice(read_level=best, read_downsample=downsample, level_mpp=slide_mpp * downsample)


def min_target_mpp(slide_mpp: float, tolerance: float) -> float:
    """The finest target_mpp a slide of ``slide_mpp`` serves: its level 0 within the tolerance (rounded
    up in the fourth significant digit, so that the number a message prints is itself accepted)."""
    finest = slide_mpp / (1 + tolerance)
    scale = 10 ** (math.floor(math.log10(finest)) - 3)
    return math.ceil(finest / scale) * scale


def tile_geometry(
    *,
    slide_mpp: float,
    level_downsamples: Sequence[float],
    target_mpp: float,
    patch_size_px: int,
    overlap: float = 0.0,
    tolerance: float = 0.1,
) -> TileGeometry:
    """Tile footprint, stride and read size for a slide at a target resolution."""
    if not 0.0 <= overlap < 1.0:
        raise GeometryError(f"overlap must be in [0, 1), got {overlap}")
    level = select_level(
        slide_mpp=slide_mpp,
        level_downsamples=level_downsamples,
        target_mpp=target_mpp,
        tolerance=tolerance,
    )
    patch_size_level0 = round(patch_size_px * target_mpp / slide_mpp)
    return TileGeometry(
        target_mpp=target_mpp,
        patch_size_px=patch_size_px,
        slide_mpp=slide_mpp,
        patch_size_level0=patch_size_level0,
        stride_level0=max(1, round(patch_size_level0 * (1.0 - overlap))),
        read_level=level.read_level,
        read_downsample=level.read_downsample,
        read_size_px=max(1, round(patch_size_level0 / level.read_downsample)),
    )


def grid_coords(*, width_lv0: int, height_lv0: int, patch_size_lv0: int, stride_lv0: int) -> np.ndarray:
    """Top-left corners of every full tile of a regular grid anchored at (0, 0).

    Returns an (n_tiles, 2) int64 array of (x_lv0, y_lv0), row-major (y, then x).
    """
    if width_lv0 < patch_size_lv0 or height_lv0 < patch_size_lv0:
        raise GeometryError(
            f"slide of {width_lv0}x{height_lv0} level-0 px is smaller than one tile "
            f"({patch_size_lv0} level-0 px, patch_size_px x target_mpp / slide mpp); use a smaller "
            "patch_size_px, or a smaller target_mpp (finer, down to the slide's own um/px)"
        )
    xs = np.arange(0, width_lv0 - patch_size_lv0 + 1, stride_lv0, dtype=np.int64)
    ys = np.arange(0, height_lv0 - patch_size_lv0 + 1, stride_lv0, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)  # (n_tiles, 2)


def footprint_means(
    values: np.ndarray,
    *,
    downsample: tuple[float, float],
    coords_lv0: np.ndarray,
    patch_size_lv0: int,
) -> np.ndarray:
    """Mean of a low-resolution image (h, w) over each tile's footprint.

    ``downsample`` is (level-0 px per image px) along x and y. Footprints are rounded to whole image
    pixels (at least one). Uses a summed-area table: cost is independent of the tile size. Returns
    float32 of shape (n_tiles,).
    """
    h, w = values.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    np.cumsum(values, axis=0, dtype=np.float64, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    dx, dy = downsample
    x0 = np.clip(np.rint(coords_lv0[:, 0] / dx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.rint(coords_lv0[:, 1] / dy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.rint((coords_lv0[:, 0] + patch_size_lv0) / dx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.rint((coords_lv0[:, 1] + patch_size_lv0) / dy).astype(np.int64), y0 + 1, h)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def tissue_fractions(
    mask: np.ndarray,
    *,
    mask_downsample: tuple[float, float],
    coords_lv0: np.ndarray,
    patch_size_lv0: int,
) -> np.ndarray:
    """Fraction of each tile's footprint that is tissue, from a low-resolution boolean mask
    (``footprint_means`` of the mask). Returns float32 of shape (n_tiles,)."""
    return footprint_means(
        mask, downsample=mask_downsample, coords_lv0=coords_lv0, patch_size_lv0=patch_size_lv0
    )
