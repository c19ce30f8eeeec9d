"""Tiling a cohort: tissue mask at low resolution, a regular grid of level-0 tile coordinates kept
where the mask says tissue, written per the tiles contract (CLAM-compatible h5 + a QC picture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import openslide
from PIL import Image, ImageDraw
from scipy import ndimage

from histotransfer.atomic import atomic_path
from histotransfer.config import TilingConfig
from histotransfer.geometry import TileGeometry, grid_coords, tile_geometry, tissue_fractions
from histotransfer.manifest import SlideRecord
from histotransfer.provenance import config_hash, provenance_attrs
from histotransfer.runner import StageResult, run_per_slide
from histotransfer.slides import (
    SlideError,
    SlideInfo,
    local_slide_path,
    open_slide,
    read_level_reduced,
    read_rgb,
    slide_info,
)
from histotransfer.tissue import detect_tissue


def mask_source(info: SlideInfo, mask_mpp: float) -> tuple[int, int]:
    """(level, integer reduction factor) giving an image close to ``mask_mpp`` without upsampling."""
    level = 0
    for i, downsample in enumerate(info.level_downsamples):
        if info.mpp * downsample <= mask_mpp:
            level = i
    level_mpp = info.mpp * info.level_downsamples[level]
    return level, max(1, math.floor(mask_mpp / level_mpp))


def compute_tissue_mask(
    slide: openslide.OpenSlide, info: SlideInfo, tiling: TilingConfig
) -> tuple[np.ndarray, tuple[float, float]]:
    """Boolean tissue mask and its (x, y) downsample relative to level 0."""
    level, factor = mask_source(info, tiling.tissue.mask_mpp)
    low = read_level_reduced(slide, level, factor)  # (h, w, 3)
    image_mpp = info.mpp * info.level_downsamples[level] * factor
    mask = detect_tissue(low, image_mpp=image_mpp, **tiling.tissue.model_dump(exclude={"mask_mpp"}))
    width, height = info.dimensions
    return mask, (width / mask.shape[1], height / mask.shape[0])


def slide_tile_geometry(info: SlideInfo, tiling: TilingConfig) -> TileGeometry:
    """Tile geometry of one slide under the tiling configuration."""
    return tile_geometry(
        slide_mpp=info.mpp,
        level_downsamples=info.level_downsamples,
        target_mpp=tiling.target_mpp,
        patch_size_px=tiling.patch_size_px,
        overlap=tiling.overlap,
        tolerance=tiling.mpp_tolerance,
    )


def candidate_coords(info: SlideInfo, geometry: TileGeometry) -> np.ndarray:
    """Every full tile of the slide's grid, before the tissue filter: (n_candidates, 2) int64."""
    width, height = info.dimensions
    return grid_coords(
        width_lv0=width,
        height_lv0=height,
        patch_size_lv0=geometry.patch_size_level0,
        stride_lv0=geometry.stride_level0,
    )


def draw_qc(
    slide: openslide.OpenSlide,
    mask: np.ndarray,
    coords: np.ndarray,
    geometry: TileGeometry,
    *,
    max_side_px: int,
) -> Image.Image:
    """Thumbnail with the tissue outline (green) and the kept tile grid (blue)."""
    thumb = slide.get_thumbnail((max_side_px, max_side_px)).convert("RGB")
    width, height = slide.dimensions
    scale_x, scale_y = thumb.width / width, thumb.height / height
    mask_thumb = np.asarray(Image.fromarray(mask).resize(thumb.size, Image.Resampling.NEAREST))
    outline = mask_thumb & ~ndimage.binary_erosion(mask_thumb, iterations=2)
    pixels = np.asarray(thumb).copy()
    pixels[outline] = (0, 170, 0)
    qc = Image.fromarray(pixels)
    draw = ImageDraw.Draw(qc)
    size = geometry.patch_size_level0
    for x, y in coords:
        box = (x * scale_x, y * scale_y, (x + size) * scale_x - 1, (y + size) * scale_y - 1)
        draw.rectangle(box, outline=(30, 60, 220))
    return qc


def _write_tiles_h5(path: Path, *, coords, fractions, geometry, info, record, tiling) -> None:
    width, height = info.dimensions
    read_w, read_h = info.level_dimensions[geometry.read_level]
    config = _tiling_config(record, tiling)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(provenance_attrs(config))
        f.attrs.update(slide_id=record.slide_id, slide_path=record.path, vendor=info.vendor)
        f.attrs.update(mpp_source=info.mpp_source, level0_width=width, level0_height=height)
        ds = f.create_dataset("coords", data=coords.astype(np.int64))  # (n_tiles, 2) x_lv0, y_lv0
        ds.attrs.update(
            # CLAM reads `patch_size` pixels at `patch_level`; we add explicit, unit-named attributes.
            patch_size=geometry.read_size_px,
            patch_level=geometry.read_level,
            read_level=geometry.read_level,
            read_downsample=geometry.read_downsample,
            patch_size_px=geometry.patch_size_px,
            patch_size_level0=geometry.patch_size_level0,
            stride_level0=geometry.stride_level0,
            target_mpp=geometry.target_mpp,
            slide_mpp=geometry.slide_mpp,
            downsample=(geometry.read_downsample, geometry.read_downsample),
            level_dim=(read_w, read_h),
            downsampled_level_dim=(read_w, read_h),
            name=record.slide_id,
        )
        f.create_dataset("tissue_fraction", data=fractions.astype(np.float32))  # (n_tiles,)


def _tiling_config(record: SlideRecord, tiling: TilingConfig) -> dict[str, Any]:
    return {
        "stage": "tile",
        "tiling": tiling.model_dump(mode="json"),
        "slide": record.path,
        "mpp": record.mpp,
    }


def tile_slide(record: SlideRecord, *, out_dir: Path, tiling: TilingConfig) -> dict[str, Any]:
    """Tile one slide into ``out_dir/{slide_id}.h5`` and ``.png``; raise SlideError when it cannot."""
    local = local_slide_path(record.path)
    try:
        with open_slide(local) as slide:
            return _tile_open_slide(slide, record, local=local, out_dir=out_dir, tiling=tiling)
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{local}: OpenSlide failed while reading pixels ({exc})") from exc


def _tile_open_slide(
    slide: openslide.OpenSlide, record: SlideRecord, *, local: Path, out_dir: Path, tiling: TilingConfig
) -> dict[str, Any]:
    info = slide_info(slide, record.mpp, name=str(local))
    geometry = slide_tile_geometry(info, tiling)
    mask, mask_downsample = compute_tissue_mask(slide, info, tiling)  # reads pixels: fails early
    candidates = candidate_coords(info, geometry)
    fractions = tissue_fractions(
        mask,
        mask_downsample=mask_downsample,
        coords_lv0=candidates,
        patch_size_lv0=geometry.patch_size_level0,
    )
    keep = fractions >= tiling.min_tissue_fraction
    coords, fractions = candidates[keep], fractions[keep]
    qc = draw_qc(slide, mask, coords, geometry, max_side_px=tiling.qc_max_side_px)
    with atomic_path(out_dir / f"{record.slide_id}.png") as tmp:
        qc.save(tmp, format="PNG")
    if len(coords) == 0:
        raise SlideError(
            f"no tissue found: 0 of {len(candidates)} candidate tiles reach "
            f"min_tissue_fraction={tiling.min_tissue_fraction} (see the QC image "
            f"{record.slide_id}.png; lower tiling.min_tissue_fraction or tiling.tissue.min_saturation)"
        )
    _write_tiles_h5(
        out_dir / f"{record.slide_id}.h5",
        coords=coords,
        fractions=fractions,
        geometry=geometry,
        info=info,
        record=record,
        tiling=tiling,
    )
    return {"n_tiles": len(coords), "read_level": geometry.read_level, "slide_mpp": info.mpp}


@dataclass(frozen=True)
class TileSet:
    """A slide's tiles as the tiles contract stores them: what every later stage reads."""

    slide_id: str
    slide_path: str  # local path or gs:// URI, as in the manifest
    coords: np.ndarray  # (n_tiles, 2) int64 level-0 x, y
    tissue_fraction: np.ndarray  # (n_tiles,) float32
    read_level: int
    read_size_px: int  # side read at read_level
    patch_size_px: int  # side of the tile at target_mpp
    patch_size_level0: int
    target_mpp: float
    slide_mpp: float
    config_hash: str


def load_tiles(path: Path) -> TileSet:
    """Read a tiles h5 file; a missing or incomplete one is a SlideError naming it."""
    if not Path(path).is_file():
        raise SlideError(f"no tiles file {path}: tiling failed or has not run (see summary.csv beside it)")
    with h5py.File(path, "r") as f:
        coords = f["coords"]
        return TileSet(
            slide_id=str(f.attrs["slide_id"]),
            slide_path=str(f.attrs["slide_path"]),
            coords=coords[:],
            tissue_fraction=f["tissue_fraction"][:],
            read_level=int(coords.attrs["read_level"]),
            read_size_px=int(coords.attrs["patch_size"]),
            patch_size_px=int(coords.attrs["patch_size_px"]),
            patch_size_level0=int(coords.attrs["patch_size_level0"]),
            target_mpp=float(coords.attrs["target_mpp"]),
            slide_mpp=float(coords.attrs["slide_mpp"]),
            config_hash=str(f.attrs["config_hash"]),
        )


def read_tile(slide: openslide.OpenSlide, tiles: TileSet, index: int) -> np.ndarray:
    """Tile ``index`` as uint8 (patch, patch, 3): read at the tiles file's level, resized to the tile size.

    Raises SlideError naming the slide and the tile when OpenSlide cannot read it.
    """
    size, (x, y) = tiles.read_size_px, tiles.coords[index]
    try:
        rgb = read_rgb(slide, (x, y), tiles.read_level, (size, size))  # (s, s, 3)
    except openslide.OpenSlideError as exc:
        raise SlideError(
            f"{tiles.slide_path}: cannot read the tile at ({x}, {y}) level {tiles.read_level}: {exc}"
        ) from exc
    if size != tiles.patch_size_px:
        p = tiles.patch_size_px
        rgb = np.array(Image.fromarray(rgb).resize((p, p), Image.Resampling.BILINEAR))  # writable copy
    return rgb


def tiles_config_hash(path: Path) -> str | None:
    """The config hash a tiles file records (None when there is no file): reads attributes only."""
    if not Path(path).is_file():
        return None
    with h5py.File(path, "r") as f:
        return str(f.attrs["config_hash"])


def tiles_stats(path: Path) -> dict[str, Any]:
    tiles = load_tiles(path)
    return {"n_tiles": len(tiles.coords), "read_level": tiles.read_level, "slide_mpp": tiles.slide_mpp}


def tile_cohort(
    records: Sequence[SlideRecord], *, out_dir: Path, tiling: TilingConfig, overwrite: bool = False
) -> StageResult:
    """Tile every slide; failures are recorded in ``out_dir/summary.csv``, never raised."""
    out_dir = Path(out_dir)
    return run_per_slide(
        records,
        stage="tile",
        output_for=lambda r: out_dir / f"{r.slide_id}.h5",
        config_hash_for=lambda r: config_hash(_tiling_config(r, tiling)),
        work=lambda r: tile_slide(r, out_dir=out_dir, tiling=tiling),
        stats_of=tiles_stats,
        summary_path=out_dir / "summary.csv",
        overwrite=overwrite,
    )
