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
from histotransfer.layout import SUMMARY, slide_file
from histotransfer.manifest import SlideRecord
from histotransfer.provenance import config_hash, provenance_attrs
from histotransfer.runner import StageResult, run_per_slide
from histotransfer.wsi.geometry import TileGeometry, footprint_means, grid_coords, tile_geometry
from histotransfer.wsi.slides import (
    SlideError,
    SlideInfo,
    local_slide_path,
    open_slide,
    read_level_reduced,
    read_rgb,
    slide_info,
)
from histotransfer.wsi.tissue import detect_tissue, optical_density, pen_mask, saturation


def mask_source(info: SlideInfo, mask_mpp: float) -> tuple[int, int]:
    """(level, integer reduction factor) giving an image close to ``mask_mpp`` without upsampling."""
    level = 0
    for i, downsample in enumerate(info.level_downsamples):
        if info.mpp * downsample <= mask_mpp:
            level = i
    level_mpp = info.mpp * info.level_downsamples[level]
    return level, max(1, math.floor(mask_mpp / level_mpp))


@dataclass(frozen=True)
class TissueMask:
    """What tiling decides from a low-resolution image of the slide, at ``downsample`` (x, y) of
    level 0: the tissue tiles may cover, the marker ink dropped from it, optical density and
    saturation."""

    tissue: np.ndarray  # (h, w) bool, ink excluded
    ink: np.ndarray  # (h, w) bool: marker ink on or beside the tissue
    optical_density: np.ndarray  # (h, w) float32
    saturation: np.ndarray  # (h, w) uint8
    downsample: tuple[float, float]

    @property
    def ink_fraction(self) -> float:
        """Ink pixels over tissue and ink pixels."""
        total = np.count_nonzero(self.tissue | self.ink)
        return float(np.count_nonzero(self.ink) / total) if total else 0.0


def compute_tissue_mask(slide: openslide.OpenSlide, info: SlideInfo, tiling: TilingConfig) -> TissueMask:
    """Tissue, ink, optical density and saturation on a low-resolution image (``tiling.tissue.mask_mpp``)."""
    config = tiling.tissue
    level, factor = mask_source(info, config.mask_mpp)
    low = read_level_reduced(slide, level, factor)  # (h, w, 3)
    image_mpp = info.mpp * info.level_downsamples[level] * factor
    ink = np.zeros(low.shape[:2], dtype=bool)
    if config.pen_hue_deg is not None:
        ink = pen_mask(low, hue_deg=config.pen_hue_deg, min_saturation=config.min_saturation)
    tissue = detect_tissue(low, image_mpp=image_mpp, settings=config, exclude=ink)
    ink &= ndimage.binary_dilation(tissue, iterations=2)  # ink on glass far from tissue: not QC's concern
    width, height = info.dimensions
    downsample = (width / low.shape[1], height / low.shape[0])
    return TissueMask(tissue, ink, optical_density(low), saturation(low), downsample)


def select_tiles(
    mask: TissueMask, candidates: np.ndarray, geometry: TileGeometry, tiling: TilingConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept, tissue fractions, dropped by QC) over the candidate tiles. A tile is kept when enough
    of it is tissue and its mean optical density and saturation are not far above those of the
    slide's median tissue tile (``max_od_ratio``, ``max_saturation_ratio``): a fold doubles the
    tissue it covers, which makes it darker and more saturated."""
    footprint = dict(
        downsample=mask.downsample, coords_lv0=candidates, patch_size_lv0=geometry.patch_size_level0
    )
    fractions = footprint_means(mask.tissue, **footprint)
    tissue = fractions >= tiling.min_tissue_fraction
    dropped = np.zeros_like(tissue)
    for image, ratio in (
        (mask.optical_density, tiling.max_od_ratio),
        (mask.saturation, tiling.max_saturation_ratio),
    ):
        if ratio is not None and tissue.any():
            values = footprint_means(image, **footprint)
            dropped |= tissue & (values > ratio * np.median(values[tissue]))
    return tissue & ~dropped, fractions, dropped


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


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The 2-px border of ``mask`` resized to ``size`` (width, height)."""
    resized = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return resized & ~ndimage.binary_erosion(resized, iterations=2)


def draw_qc(
    slide: openslide.OpenSlide,
    mask: TissueMask,
    coords: np.ndarray,
    dropped: np.ndarray,
    geometry: TileGeometry,
    *,
    max_side_px: int,
) -> Image.Image:
    """Thumbnail with the tissue outline (green), marker ink (red outline), the kept tiles (blue) and
    the tissue tiles QC dropped (red)."""
    thumb = slide.get_thumbnail((max_side_px, max_side_px)).convert("RGB")
    width, height = slide.dimensions
    scale_x, scale_y = thumb.width / width, thumb.height / height
    pixels = np.asarray(thumb).copy()
    pixels[_outline(mask.tissue, thumb.size)] = (0, 170, 0)
    pixels[_outline(mask.ink, thumb.size)] = (220, 30, 30)
    qc = Image.fromarray(pixels)
    draw = ImageDraw.Draw(qc)
    size = geometry.patch_size_level0
    for tiles, colour in ((coords, (30, 60, 220)), (dropped, (220, 30, 30))):
        for x, y in tiles:
            box = (x * scale_x, y * scale_y, (x + size) * scale_x - 1, (y + size) * scale_y - 1)
            draw.rectangle(box, outline=colour)
    return qc


def _write_tiles_h5(path: Path, *, coords, fractions, geometry, info, record, tiling, qc) -> None:
    width, height = info.dimensions
    read_w, read_h = info.level_dimensions[geometry.read_level]
    config = _tiling_config(record, tiling)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(provenance_attrs(config))
        f.attrs.update(slide_id=record.slide_id, slide_path=record.path, vendor=info.vendor)
        f.attrs.update(mpp_source=info.mpp_source, level0_width=width, level0_height=height)
        f.attrs.update(qc)  # what QC dropped: ink (share of tissue + ink), tiles (folds)
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
    mask = compute_tissue_mask(slide, info, tiling)  # reads pixels: fails early
    candidates = candidate_coords(info, geometry)
    keep, fractions, dropped = select_tiles(mask, candidates, geometry, tiling)
    coords, fractions = candidates[keep], fractions[keep]
    qc = draw_qc(slide, mask, coords, candidates[dropped], geometry, max_side_px=tiling.qc_max_side_px)
    with atomic_path(slide_file(out_dir, record.slide_id, ".png")) as tmp:
        qc.save(tmp, format="PNG")
    if len(coords) == 0:
        raise SlideError(
            f"no tissue found: 0 of {len(candidates)} candidate tiles reach "
            f"min_tissue_fraction={tiling.min_tissue_fraction} (see the QC image "
            f"{record.slide_id}.png; lower tiling.min_tissue_fraction or tiling.tissue.min_saturation)"
        )
    _write_tiles_h5(
        slide_file(out_dir, record.slide_id),
        coords=coords,
        fractions=fractions,
        geometry=geometry,
        info=info,
        record=record,
        tiling=tiling,
        qc={"ink_fraction": round(mask.ink_fraction, 4), "qc_dropped_tiles": int(dropped.sum())},
    )
    return tiles_stats(slide_file(out_dir, record.slide_id))


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
    """A tiles file's line in summary.csv."""
    tiles = load_tiles(path)
    with h5py.File(path, "r") as f:
        qc = {
            "ink_fraction": float(f.attrs["ink_fraction"]),
            "qc_dropped_tiles": int(f.attrs["qc_dropped_tiles"]),
        }
    stats = {"n_tiles": len(tiles.coords), "read_level": tiles.read_level, "slide_mpp": tiles.slide_mpp}
    return stats | qc


def tile_cohort(
    records: Sequence[SlideRecord],
    *,
    out_dir: Path,
    tiling: TilingConfig,
    overwrite: bool = False,
    summary_path: Path | None = None,
) -> StageResult:
    """Tile every slide; failures are recorded in ``summary_path`` (default ``out_dir/summary.csv``),
    never raised."""
    out_dir = Path(out_dir)
    return run_per_slide(
        records,
        stage="tile",
        output_for=lambda r: slide_file(out_dir, r.slide_id),
        config_hash_for=lambda r: config_hash(_tiling_config(r, tiling)),
        work=lambda r: tile_slide(r, out_dir=out_dir, tiling=tiling),
        stats_of=tiles_stats,
        summary_path=summary_path or out_dir / SUMMARY,
        overwrite=overwrite,
    )
