"""Tiling a cohort: tissue mask at low resolution, a regular grid of level-0 tile coordinates kept
where the mask says tissue, written per the tiles contract (CLAM-compatible h5 + a QC picture).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import openslide
from PIL import Image
from scipy import ndimage

from histotransfer.core.config import TilingConfig
from histotransfer.io import lineage
from histotransfer.io.atomic import atomic_path
from histotransfer.io.layout import SUMMARY, slide_file
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.marks import png_info
from histotransfer.io.provenance import config_hash, provenance_attrs
from histotransfer.io.runner import StageResult, run_per_slide
from histotransfer.wsi.geometry import TileGeometry, footprint_means, grid_coords, tile_geometry
from histotransfer.wsi.regions import RegionReader, SlideRegions
from histotransfer.wsi.slides import (
    SlideError,
    SlideInfo,
    local_slide_path,
    open_slide,
    read_level_reductions,
    slide_info,
)
from histotransfer.wsi.tissue import detect_tissue, optical_density, pen_mask, saturation

STRIP_PX = 4096  # rows of a level read at once for the mask (read_level_reductions)


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
    picture: np.ndarray | None = None  # (h', w', 3) uint8: the slide from the same read, for QC

    @property
    def ink_fraction(self) -> float:
        """Ink pixels over tissue and ink pixels."""
        total = np.count_nonzero(self.tissue | self.ink)
        return float(np.count_nonzero(self.ink) / total) if total else 0.0


def compute_tissue_mask(
    slide: openslide.OpenSlide, info: SlideInfo, tiling: TilingConfig, *, picture_side_px: int | None = None
) -> TissueMask:
    """Tissue, ink, optical density and saturation on a low-resolution image (``tiling.tissue.mask_mpp``).

    ``picture_side_px``: also keep a picture of the slide no larger than this on either side, reduced
    from the same read of the same level (a QC picture costs no second read).
    """
    config = tiling.tissue
    level, factor = mask_source(info, config.mask_mpp)
    factors = [factor]
    if picture_side_px is not None:
        reduce_by = max(1, math.ceil(max(info.level_dimensions[level]) / picture_side_px))
        if math.lcm(factor, reduce_by) > STRIP_PX:  # strips hold whole rows of both: keep them small
            reduce_by = math.ceil(reduce_by / factor) * factor
        factors.append(reduce_by)
    low, *picture = read_level_reductions(slide, level, factors, STRIP_PX)  # (h, w, 3)
    image_mpp = info.mpp * info.level_downsamples[level] * factor
    sat = saturation(low)
    ink = np.zeros(low.shape[:2], dtype=bool)
    if config.pen_hue_deg is not None:
        ink = pen_mask(low, hue_deg=config.pen_hue_deg, min_saturation=config.min_saturation, sat=sat)
    tissue = detect_tissue(low, image_mpp=image_mpp, settings=config, exclude=ink, sat=sat)
    ink &= ndimage.binary_dilation(tissue, iterations=2)  # ink on glass far from tissue: not QC's concern
    width, height = info.dimensions
    downsample = (width / low.shape[1], height / low.shape[0])
    return TissueMask(tissue, ink, optical_density(low), sat, downsample, picture[0] if picture else None)


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


def _box_outlines(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """(h, w) bool: the 1-px outlines of ``boxes`` (n, 4) int (x0, y0, x1, y1, inclusive, inside the
    image), drawn at once as runs: each edge is a +1/-1 pair on a row (or column) and a cumulative sum."""
    h, w = shape
    x0, y0, x1, y1 = boxes.T
    rows = np.zeros((h, w + 1), dtype=np.int32)  # top and bottom edges, runs along x
    cols = np.zeros((h + 1, w), dtype=np.int32)  # left and right edges, runs along y
    for y in (y0, y1):
        np.add.at(rows, (y, x0), 1)
        np.add.at(rows, (y, x1 + 1), -1)
    for x in (x0, x1):
        np.add.at(cols, (y0, x), 1)
        np.add.at(cols, (y1 + 1, x), -1)
    return (np.cumsum(rows, axis=1)[:, :w] > 0) | (np.cumsum(cols, axis=0)[:h] > 0)


def draw_qc(
    mask: TissueMask, coords: np.ndarray, dropped: np.ndarray, geometry: TileGeometry, *, dimensions
) -> Image.Image:
    """The mask's picture of the slide with the tissue outline (green), marker ink (red outline), the
    kept tiles (blue) and the tissue tiles QC dropped (red). ``dimensions``: the slide's level-0 (w, h)."""
    if mask.picture is None:
        raise ValueError("the tissue mask was computed without a picture (picture_side_px)")
    pixels = mask.picture.copy()
    h, w = pixels.shape[:2]
    pixels[_outline(mask.tissue, (w, h))] = (0, 170, 0)
    pixels[_outline(mask.ink, (w, h))] = (220, 30, 30)
    scale = np.array([w / dimensions[0], h / dimensions[1]])
    size = geometry.patch_size_level0
    for tiles, colour in ((coords, (30, 60, 220)), (dropped, (220, 30, 30))):
        if len(tiles):
            start = np.floor(tiles * scale).astype(np.int64)
            end = np.maximum(np.ceil((tiles + size) * scale).astype(np.int64) - 1, start)
            boxes = np.concatenate([start, end], axis=1)
            boxes = np.clip(boxes, 0, [w - 1, h - 1, w - 1, h - 1])
            pixels[_box_outlines((h, w), boxes)] = colour
    return Image.fromarray(pixels)


def tiling_hash(tiling: TilingConfig) -> str:
    """The hash of the settings that decide the tiles (the QC picture's switch changes none)."""
    return config_hash(tiling.model_dump(mode="json", exclude={"qc_image"}))


def _write_tiles_h5(path: Path, *, coords, fractions, geometry, info, record, tiling, qc, identity) -> None:
    width, height = info.dimensions
    read_w, read_h = info.level_dimensions[geometry.read_level]
    config = _tiling_config(record, tiling, lineage.resume_identity(record.path, identity))
    coords, fractions = coords.astype(np.int64), fractions.astype(np.float32)
    geometry_read = {
        "read_level": geometry.read_level,
        "read_size_px": geometry.read_size_px,
        "patch_size_px": geometry.patch_size_px,
        "patch_size_level0": geometry.patch_size_level0,
        "stride_level0": geometry.stride_level0,
        "target_mpp": geometry.target_mpp,
        "slide_mpp": geometry.slide_mpp,
        "level0": [width, height],
    }
    made_from = lineage.tiles_record(
        record, identity, tiling_hash(tiling), coords, fractions, _geometry(geometry_read)
    )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(provenance_attrs(config))
        f.attrs[lineage.LINEAGE] = lineage.h5_attr(made_from)
        f.attrs.update(slide_id=record.slide_id, slide_path=record.path, vendor=info.vendor)
        f.attrs.update(mpp_source=info.mpp_source, level0_width=width, level0_height=height)
        f.attrs.update(qc)  # what QC dropped: ink (share of tissue + ink), tiles (folds)
        ds = f.create_dataset("coords", data=coords)  # (n_tiles, 2) x_lv0, y_lv0
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
        f.create_dataset("tissue_fraction", data=fractions)  # (n_tiles,)


def _tiling_config(record: SlideRecord, tiling: TilingConfig, identity: dict | None) -> dict[str, Any]:
    """What one slide's tiles are made from (``identity``: lineage.resume_identity of its slide)."""
    return {
        "stage": "tile",
        # The QC picture's switch changes no tile: tiles made with or without it are the same output.
        "tiling": tiling.model_dump(mode="json", exclude={"qc_image"}),
        "slide": record.path if identity is None else None,  # the content, not where it lies: a moved
        "identity": identity,  # study (or slide) is not tiled again
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
    picture_side = tiling.qc_max_side_px if tiling.qc_image else None
    mask = compute_tissue_mask(slide, info, tiling, picture_side_px=picture_side)  # reads pixels: fails early
    candidates = candidate_coords(info, geometry)
    keep, fractions, dropped = select_tiles(mask, candidates, geometry, tiling)
    coords, fractions = candidates[keep], fractions[keep]
    if tiling.qc_image:
        qc = draw_qc(mask, coords, candidates[dropped], geometry, dimensions=info.dimensions)
        with atomic_path(slide_file(out_dir, record.slide_id, ".png")) as tmp:
            qc.save(
                tmp, format="PNG", compress_level=1, pnginfo=png_info()
            )  # ~5x faster than the default, ~1.3x the bytes
    if len(coords) == 0:
        see = f"see the QC image {record.slide_id}.png; " if tiling.qc_image else ""
        raise SlideError(
            f"no tissue found: 0 of {len(candidates)} candidate tiles reach "
            f"min_tissue_fraction={tiling.min_tissue_fraction} ({see}lower "
            "tiling.min_tissue_fraction or tiling.tissue.min_saturation)"
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
        identity=lineage.slide_identity(local, slide),
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
    lineage: dict[str, Any] | None = None  # what the tiles were made from (histotransfer.io.lineage)

    def subset(self, indices: np.ndarray) -> TileSet:
        """These tiles only (coords and tissue fractions), in the order of ``indices``."""
        return dataclasses.replace(
            self, coords=self.coords[indices], tissue_fraction=self.tissue_fraction[indices]
        )


def _geometry(values: dict[str, Any]) -> dict[str, Any]:
    """How a tiles file's coordinates are read, as its lineage digest covers it (plain numbers)."""
    ints = ("read_level", "read_size_px", "patch_size_px", "patch_size_level0", "stride_level0")
    return {
        **{k: int(values[k]) for k in ints},
        "target_mpp": float(values["target_mpp"]),
        "slide_mpp": float(values["slide_mpp"]),
        "level0": [int(v) for v in values["level0"]],
    }


def load_tiles(path: Path) -> TileSet:
    """Read a tiles h5 file; a missing, unreadable or inconsistent one (coordinates that are not (n, 2)
    or fall outside the slide it records, content that is not what its lineage recorded) is a
    SlideError naming it."""
    if not Path(path).is_file():
        raise SlideError(f"no tiles file {path}: tiling failed or has not run (see summary.csv beside it)")
    try:
        with h5py.File(path, "r") as f:
            coords = f["coords"]
            raw = f.attrs.get(lineage.LINEAGE)
            tiles = TileSet(
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
                lineage=lineage.parse_attr(raw, "tiles"),
            )
            size = (int(f.attrs["level0_width"]), int(f.attrs["level0_height"]))
            geometry = _geometry({**coords.attrs, "read_size_px": coords.attrs["patch_size"], "level0": size})
    except (OSError, KeyError, ValueError, TypeError) as exc:
        why = f"{path}: not a readable tiles file ({exc}); move it away and tile the slide again"
        raise SlideError(why) from exc
    if (
        tiles.lineage is not None
        and lineage.tiles_digest(tiles.coords, tiles.tissue_fraction, geometry) != (tiles.lineage["digest"])
    ):
        raise SlideError(
            f"{path} was changed after tiling (its coordinates or geometry are not what its lineage "
            "recorded): move it away and tile the slide again"
        )
    c = tiles.coords
    if c.ndim != 2 or c.shape[1] != 2 or len(tiles.tissue_fraction) != len(c) or c.dtype.kind not in "iu":
        raise SlideError(f"{path}: coords of shape {c.shape} ({c.dtype}) are not (n, 2) integers; tile again")
    if len(c) and (c.min() < 0 or (c + tiles.patch_size_level0 > np.array(size)).any()):
        raise SlideError(
            f"{path}: tile coordinates fall outside the {size[0]}x{size[1]} px slide it records; tile again"
        )
    return tiles


# How a tile read at a level finer than the target becomes a tile: an area (box) filter, Image.reduce
# for whole factors (the usual 2x of a 40x scan read for 0.5 um/px). Recorded in the features'
# provenance; until issue 17 it was a bilinear resize (see docs/adr/0014-read-path.md).
TILE_RESIZE = "area"


def read_tile(regions: RegionReader | openslide.OpenSlide, tiles: TileSet, index: int) -> np.ndarray:
    """Tile ``index`` as writable uint8 (patch, patch, 3): read at the tiles file's level (through
    ``regions``, see histotransfer.wsi.regions, or an OpenSlide handle), area-filtered to the tile size.

    Raises SlideError naming the slide and the tile when it cannot be read.
    """
    if isinstance(regions, openslide.OpenSlide):
        regions = SlideRegions(regions)
    size, (x, y) = tiles.read_size_px, tiles.coords[index]
    try:
        rgb = regions.read((x, y), tiles.read_level, (size, size))  # (s, s, 3)
    except (openslide.OpenSlideError, OSError, RuntimeError, ValueError) as exc:
        raise SlideError(
            f"{tiles.slide_path}: cannot read the tile at ({x}, {y}) level {tiles.read_level}: {exc}"
        ) from exc
    p = tiles.patch_size_px
    if size != p:
        image = Image.fromarray(rgb)
        if size % p == 0:
            rgb = np.array(image.reduce(size // p))  # the mean of each factor x factor block
        else:
            rgb = np.array(image.resize((p, p), Image.Resampling.BOX))
    return rgb


def tiles_digest(path: Path) -> str | None:
    """The content digest a tiles file's lineage records (None when there is no file or no record):
    reads attributes only."""
    record = lineage.read_record(path, "tiles") if Path(path).is_file() else None
    return None if record is None else record.get("digest")


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
        config_hash_for=lambda r: config_hash(_tiling_config(r, tiling, lineage.resume_identity(r.path))),
        work=lambda r: tile_slide(r, out_dir=out_dir, tiling=tiling),
        stats_of=tiles_stats,
        summary_path=summary_path or out_dir / SUMMARY,
        overwrite=overwrite,
    )
