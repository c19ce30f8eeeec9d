"""Tissue detection on a low-resolution image: Otsu on HSV saturation, then morphology; marker ink
(by hue, and black ink as dark grey), which tiling QC drops; optical density, by which it drops tiles
far darker than the slide's own (folds).

Sizes are given in microns so one parameter set works whatever resolution the mask is computed at.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from histotransfer.config import TissueConfig


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an (h, w, 3) uint8 image as uint8 in [0, 255]."""
    rgb = rgb.astype(np.int32)
    cmax = rgb.max(axis=2)
    cmin = rgb.min(axis=2)
    sat = np.zeros(cmax.shape, dtype=np.int32)
    np.divide((cmax - cmin) * 255, cmax, out=sat, where=cmax > 0, casting="unsafe")
    return sat.astype(np.uint8)


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


def detect_tissue(
    rgb: np.ndarray,
    *,
    image_mpp: float,
    settings: TissueConfig | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean tissue mask (h, w) of an (h, w, 3) uint8 RGB image whose pixels are ``image_mpp`` um.

    ``settings``: the config's tissue section (its defaults when None). The saturation threshold is
    Otsu's, floored at ``min_saturation`` so that a blank slide (where Otsu would split glass noise in
    two) yields no tissue; ``saturation_threshold`` fixes it instead. ``exclude`` (h, w) marks pixels
    that are not tissue whatever they look like (e.g. marker ink): they take no part in Otsu's
    threshold and are never in the mask.
    """
    settings = settings or TissueConfig()
    saturation_threshold, min_saturation = settings.saturation_threshold, settings.min_saturation
    median_size_px, closing_radius_um = settings.median_size_px, settings.closing_radius_um
    min_object_um2, min_hole_um2 = settings.min_object_um2, settings.min_hole_um2
    sat = saturation(rgb)
    if median_size_px > 1:
        sat = ndimage.median_filter(sat, size=median_size_px)
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
    holes = _drop_small(~mask, min_hole_um2 / px_area_um2)
    # Holes touching the border are background, not holes: keep them.
    border = ndimage.label(~mask)[0]
    border_labels = np.unique(np.concatenate([border[0], border[-1], border[:, 0], border[:, -1]]))
    small_holes = ~mask & ~holes & ~np.isin(border, border_labels[border_labels > 0])
    mask |= small_holes
    return mask if exclude is None else mask & ~exclude


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue of an (h, w, 3) uint8 image in degrees [0, 360) (0 where the pixel is grey)."""
    from skimage.color import rgb2hsv

    return rgb2hsv(rgb)[..., 0] * 360.0


def pen_mask(rgb: np.ndarray, *, hue_deg: tuple[float, float], min_saturation: int) -> np.ndarray:
    """Marker ink: saturated pixels whose hue is in ``hue_deg`` (blue and green markers; H&E stays in
    the magenta-purple hues above it), and pixels both dark and grey (black marker: stained tissue as
    dark as that is strongly coloured)."""
    hue = hue_degrees(rgb)
    sat = saturation(rgb)
    coloured = (hue >= hue_deg[0]) & (hue <= hue_deg[1]) & (sat > min_saturation)
    black = (rgb.max(axis=2) < BLACK_INK_MAX_VALUE) & (sat < BLACK_INK_MAX_SATURATION)
    return coloured | black


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the channels, (h, w) float32: -log of the transmitted light."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=2)
