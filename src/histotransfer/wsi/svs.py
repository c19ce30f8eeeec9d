"""Writing Aperio-style pyramidal SVS files (JPEG tiles, MPP and AppMag in the description)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histotransfer.io.atomic import atomic_path


def reduce_rgb(rgb: np.ndarray, factor: int, strip_px: int = 4096) -> np.ndarray:
    """Box-downscale an (h, w, 3) uint8 image by an integer factor, in strips to bound memory."""
    if factor == 1:
        return rgb
    strip = max(factor, strip_px - strip_px % factor)
    parts = [
        np.asarray(Image.fromarray(rgb[y : y + strip]).reduce(factor)) for y in range(0, rgb.shape[0], strip)
    ]
    return np.concatenate(parts, axis=0)


def aperio_description(width: int, height: int, *, mpp: float, app_mag: float, tile_px: int) -> str:
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile_px}x{tile_px}) JPEG/RGB Q=85|AppMag = {app_mag:g}|MPP = {mpp:.4f}"
        "|Filename = histotransfer-sample"
    )


def write_aperio_svs(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float,
    downsamples: Sequence[int] = (4, 16),
    tile_px: int = 256,
    quality: int = 85,
) -> Path:
    """Write ``rgb`` (h, w, 3 uint8, level 0) as a tiled JPEG SVS with reduced levels, atomically.

    OpenSlide opens the result as vendor ``aperio`` with ``mpp`` and an objective power of 10/mpp.
    """
    height, width = rgb.shape[:2]
    app_mag = round(10.0 / mpp, 1)
    options = dict(tile=(tile_px, tile_px), compression="jpeg", compressionargs={"level": quality})
    options |= dict(photometric="rgb", metadata=None)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
        desc = aperio_description(width, height, mpp=mpp, app_mag=app_mag, tile_px=tile_px)
        tw.write(rgb, description=desc, subfiletype=0, **options)
        level, done = rgb, 1
        for downsample in downsamples:
            level, done = reduce_rgb(level, downsample // done), downsample
            desc = f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {level.shape[1]}x{level.shape[0]}"
            tw.write(level, description=desc, subfiletype=1, **options)
    return Path(path)
