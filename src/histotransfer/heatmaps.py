"""Pictures drawn from saved artifacts (no re-extraction): attention heatmaps on slide thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from histotransfer.atomic import atomic_path
from histotransfer.slides import local_slide_path, open_slide


def attention_heatmap(
    slide_path: str,
    coords: np.ndarray,
    attention: np.ndarray,
    *,
    patch_size_level0: int,
    out: Path,
    max_side_px: int = 1000,
    alpha: float = 0.55,
) -> Path:
    """Thumbnail with each tile coloured by its attention rank (inferno), beside the plain thumbnail."""
    with open_slide(local_slide_path(slide_path)) as slide:
        thumb = slide.get_thumbnail((max_side_px, max_side_px)).convert("RGB")
        width, height = slide.dimensions
    sx, sy = thumb.width / width, thumb.height / height
    ranks = attention.argsort().argsort() / max(1, len(attention) - 1)  # (n_tiles,) in [0, 1]
    colours = (colormaps["inferno"](ranks)[:, :3] * 255).astype(np.uint8)  # (n_tiles, 3)
    overlay = np.asarray(thumb).copy()
    covered = np.zeros(overlay.shape[:2], dtype=bool)
    paint = np.zeros_like(overlay)
    for (x, y), colour in zip(coords, colours, strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = int(np.ceil((x + patch_size_level0) * sx)), int(np.ceil((y + patch_size_level0) * sy))
        paint[y0:y1, x0:x1] = colour
        covered[y0:y1, x0:x1] = True
    overlay[covered] = (alpha * paint[covered] + (1 - alpha) * overlay[covered]).astype(np.uint8)
    canvas = Image.new("RGB", (thumb.width * 2 + 10, thumb.height), "white")
    canvas.paste(thumb, (0, 0))
    canvas.paste(Image.fromarray(overlay), (thumb.width + 10, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out
