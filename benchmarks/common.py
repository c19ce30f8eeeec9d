"""What the benchmarks share: a realistic 40x slide made of real H&E pixels, generated once and cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histotransfer.assets import cache_dir
from histotransfer.wsi.sample_data import compose_slide, load_sources
from histotransfer.wsi.svs import write_aperio_svs

MPP = 0.25  # a 40x scan


def benchmark_slide(pieces: int) -> Path:
    """A 0.25 um/px Aperio slide of ``pieces`` tissue pieces (42 pieces: 43,617 x 37,386 px)."""
    path = cache_dir() / "bench" / f"tiling-40x-{pieces}pieces.svs"
    if not path.is_file():
        print(f"generating {path} (once) ...", flush=True)
        composed = compose_slide(
            load_sources(), np.random.default_rng(0), mpp=MPP, tissue_pieces=pieces, lesion_fraction=None
        )
        write_aperio_svs(path, composed.rgb, mpp=MPP)
    return path
