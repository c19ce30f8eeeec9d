"""Tissue detection on a low-resolution image: Otsu on HSV saturation, then morphology; marker ink
(by hue, and black ink as dark grey), which tiling QC drops; optical density, by which it drops tiles
far darker than the slide's own (folds).

Sizes are given in microns so one parameter set works whatever resolution the mask is computed at.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from histotransfer.core.config import TissueConfig
from histotransfer.core.cpus import available_cpus


def _saturation_table() -> np.ndarray:
    """(256, 256) uint8: the saturation of a pixel whose brightest channel is ``row`` and whose
    channel range is ``column`` (floor of 255 * range / max, 0 for black)."""
    cmax = np.arange(256, dtype=np.int32)[:, None]
    delta = np.arange(256, dtype=np.int32)[None, :]
    return np.where(cmax > 0, delta * 255 // np.maximum(cmax, 1), 0).astype(np.uint8)


_SATURATION = _saturation_table()
# Optical density per 8-bit channel value, computed once in float32 as the per-pixel formula would.
_OPTICAL_DENSITY = -np.log((np.arange(256, dtype=np.float32) + np.float32(1.0)) / np.float32(256.0))


def channel_max(rgb: np.ndarray) -> np.ndarray:
    """(h, w) brightest channel of an (h, w, 3) image (30x faster than ``rgb.max(axis=2)``)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an (h, w, 3) uint8 image as uint8 in [0, 255] (a table lookup on the
    brightest channel and the channel range: exact, and much faster than the arithmetic)."""
    cmax = channel_max(rgb)
    delta = cmax - np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # never negative
    return np.take(_SATURATION.ravel(), (cmax.astype(np.intp) << 8) | delta)


RED_SECTOR_DEG = (300.0, 60.0)  # the hues of pixels whose red channel is strictly the brightest
BLACK_INK_MAX_VALUE = 90  # brightest channel below this (of 255) ...
BLACK_INK_MAX_SATURATION = 80  # ... with saturation below this: black ink, not stained tissue


def _disk(radius_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    return xx**2 + yy**2 <= radius_px**2


def _drop_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area_px
    keep[0] = False
    return keep[labels]


def median_filter(image: np.ndarray, size: int, *, threads: int | None = None) -> np.ndarray:
    """``scipy.ndimage.median_filter(image, size)`` of a uint8 image, exactly (mirrored borders), by
    scikit-image's histogram-based rank filter (~3x faster at the sizes tissue detection uses), on
    bands of rows in ``threads`` threads (default: the CPUs available, at most 4; it frees the GIL)."""
    from skimage.filters.rank import median

    before = size // 2
    padded = np.pad(image, (before, size - 1 - before), mode="symmetric")
    footprint = np.ones((size, size), dtype=bool)
    height, width = image.shape

    def band(rows: tuple[int, int]) -> np.ndarray:  # image rows [start, stop), from their padded rows
        start, stop = rows
        filtered = median(padded[start : stop + size - 1], footprint)
        return filtered[before : before + stop - start, before : before + width]

    threads = min(threads or min(4, available_cpus()), max(1, height // 64))
    edges = np.linspace(0, height, threads + 1).astype(int)
    rows = list(itertools.pairwise(edges))
    if threads == 1:
        return band(rows[0])
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(band, rows)), axis=0)


def detect_tissue(
    rgb: np.ndarray,
    *,
    image_mpp: float,
    settings: TissueConfig | None = None,
    exclude: np.ndarray | None = None,
    sat: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean tissue mask (h, w) of an (h, w, 3) uint8 RGB image whose pixels are ``image_mpp`` um.

    ``settings``: the config's tissue section (its defaults when None). The saturation threshold is
    Otsu's, floored at ``min_saturation`` so that a blank slide (where Otsu would split glass noise in
    two) yields no tissue; ``saturation_threshold`` fixes it instead. ``exclude`` (h, w) marks pixels
    that are not tissue whatever they look like (e.g. marker ink): they take no part in Otsu's
    threshold and are never in the mask. ``sat``: ``saturation(rgb)`` when the caller has it.
    """
    settings = settings or TissueConfig()
    saturation_threshold, min_saturation = settings.saturation_threshold, settings.min_saturation
    median_size_px, closing_radius_um = settings.median_size_px, settings.closing_radius_um
    min_object_um2, min_hole_um2 = settings.min_object_um2, settings.min_hole_um2
    sat = saturation(rgb) if sat is None else sat
    if median_size_px > 1:
        sat = median_filter(sat, median_size_px)
    if saturation_threshold is None:
        values = sat if exclude is None else sat[~exclude]
        otsu = threshold_otsu(values) if values.size and values.min() != values.max() else 255
        threshold = max(int(otsu), min_saturation)
    else:
        threshold = saturation_threshold
    mask = sat > threshold
    radius_px = round(closing_radius_um / image_mpp)
    if radius_px >= 1:
        mask = ndimage.binary_closing(mask, structure=_disk(radius_px), border_value=0)
    px_area_um2 = image_mpp**2
    mask = _drop_small(mask, min_object_um2 / px_area_um2)
    # Fill the small holes; those touching the border are background, not holes: keep them.
    background, n = ndimage.label(~mask)
    fill = np.bincount(background.ravel(), minlength=n + 1) < min_hole_um2 / px_area_um2
    fill[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    fill[0] = False  # tissue
    mask |= fill[background]
    return mask if exclude is None else mask & ~exclude


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue of an (h, w, 3) uint8 image in degrees [0, 360) (0 where the pixel is grey)."""
    from skimage.color import rgb2hsv

    return rgb2hsv(rgb)[..., 0] * 360.0


def pen_mask(
    rgb: np.ndarray, *, hue_deg: tuple[float, float], min_saturation: int, sat: np.ndarray | None = None
) -> np.ndarray:
    """Marker ink: saturated pixels whose hue is in ``hue_deg`` (blue and green markers; H&E stays in
    the magenta-purple hues above it), and pixels both dark and grey (black marker: stained tissue as
    dark as that is strongly coloured). ``sat``: ``saturation(rgb)`` when the caller has it.

    Hue is computed only where it can fall in ``hue_deg``: on saturated pixels (the glass is most of a
    slide) and, when the range lies within [60, 300] degrees, not where red is strictly the brightest
    channel (HSV puts those pixels' hue in (300, 360) or [0, 60): most of H&E)."""
    sat = saturation(rgb) if sat is None else sat
    candidates = sat > min_saturation
    if RED_SECTOR_DEG[1] <= hue_deg[0] and hue_deg[1] <= RED_SECTOR_DEG[0]:
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        candidates &= ~((red > green) & (red > blue))
    hue = hue_degrees(rgb[candidates][None])[0]  # (n_candidates,)
    coloured = np.zeros_like(candidates)
    coloured[candidates] = (hue >= hue_deg[0]) & (hue <= hue_deg[1])
    black = (channel_max(rgb) < BLACK_INK_MAX_VALUE) & (sat < BLACK_INK_MAX_SATURATION)
    return coloured | black


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the channels, (h, w) float32: -log of the transmitted light."""
    od = _OPTICAL_DENSITY
    # The mean over the channels, summed in the order ``mean(axis=2)`` sums them: the same float32.
    return (od[rgb[..., 0]] + od[rgb[..., 1]] + od[rgb[..., 2]]) / np.float32(3)
