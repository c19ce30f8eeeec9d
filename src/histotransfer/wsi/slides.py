"""Opening whole-slide images (local or ``gs://``), their resolution, and reading pixels from them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from histotransfer.core.config import PLAUSIBLE_MPP
from histotransfer.core.errors import SlideError
from histotransfer.io.storage import fetch_gcs, is_gcs_uri

_UM_PER_UNIT = {"centimeter": 1e4, "millimeter": 1e3, "micrometer": 1.0}


@dataclass(frozen=True)
class SlideInfo:
    """What tiling needs to know about an opened slide."""

    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float  # level-0 microns per pixel
    mpp_source: str  # "slide" or "manifest"
    objective_power: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]


def local_slide_path(path: str) -> Path:
    """A local file for ``path``: itself, or the cached download of a ``gs://`` URI."""
    return fetch_gcs(path) if is_gcs_uri(path) else Path(path)


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a local slide with OpenSlide, turning its errors into a SlideError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideError(f"{path}: not a slide format OpenSlide can open ({exc})") from exc
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: OpenSlide cannot read this file ({exc})") from exc


def slide_mpp_from_properties(props: dict[str, str]) -> float | None:
    """Level-0 microns per pixel recorded in the slide, or None when it records none."""
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        if value := props.get(key):
            return float(value)
    unit = props.get("tiff.ResolutionUnit", "").lower()
    resolution = props.get("tiff.XResolution")
    if unit in _UM_PER_UNIT and resolution and float(resolution) > 0:
        return _UM_PER_UNIT[unit] / float(resolution)
    return None


def resolve_mpp(props: dict[str, str], manifest_mpp: float | None, *, name: str) -> tuple[float, str]:
    """The slide's own plausible mpp, else the manifest's; neither is an error saying what to do."""
    mpp = slide_mpp_from_properties(props)
    if mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return mpp, "slide"
    if manifest_mpp is not None:
        return manifest_mpp, "manifest"
    recorded = (
        "records no resolution" if mpp is None else f"records an implausible resolution ({mpp:g} um/px)"
    )
    raise SlideError(
        f"{name}: the slide {recorded}; add an `mpp` column to the manifest with this slide's "
        "level-0 microns per pixel (e.g. 0.25 for a 40x scan, 0.5 for 20x), or, for a single slide "
        "given to `histotransfer predict`, pass it with --mpp"
    )


def slide_info(slide: openslide.OpenSlide, manifest_mpp: float | None, *, name: str) -> SlideInfo:
    props = dict(slide.properties)
    mpp, source = resolve_mpp(props, manifest_mpp, name=name)
    power = props.get("openslide.objective-power")
    return SlideInfo(
        vendor=props.get("openslide.vendor", "unknown"),
        level_dimensions=tuple(tuple(d) for d in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp=mpp,
        mpp_source=source,
        objective_power=float(power) if power else None,
    )


def read_rgb(
    slide: openslide.OpenSlide, xy_lv0: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
    """(h, w, 3) uint8 region, writable; transparent pixels (outside the scanned area) become white."""
    rgba = slide.read_region((int(xy_lv0[0]), int(xy_lv0[1])), level, size)
    rgb = np.array(rgba.convert("RGB"))  # Pillow splits the bands contiguously: ~3x numpy's strided copy
    clear = np.asarray(rgba.getchannel("A")) == 0
    if clear.any():
        rgb[clear] = 255
    return rgb


def read_level_reductions(
    slide: openslide.OpenSlide, level: int, factors: Sequence[int], strip_px: int = 4096
) -> list[np.ndarray]:
    """A whole level, box-downscaled by each integer factor, from one read in strips (bounded memory)."""
    width, height = slide.level_dimensions[level]
    downsample = slide.level_downsamples[level]
    step = math.lcm(*factors)  # every strip boundary falls on a whole output row of every factor
    strip = max(step, strip_px - strip_px % step)
    rows: list[list[np.ndarray]] = [[] for _ in factors]
    for y in range(0, height, strip):
        h = min(strip, height - y)
        region = read_rgb(slide, (0, round(y * downsample)), level, (width, h))
        image = Image.fromarray(region)
        for out, factor in zip(rows, factors, strict=True):
            out.append(np.asarray(image.reduce(factor)) if factor > 1 else region)
    return [np.concatenate(out, axis=0) for out in rows]
