"""What the benchmarks share: realistic slides made of real H&E pixels, generated once and cached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histotransfer.io.assets import cache_dir
from histotransfer.wsi.sample_data import compose_slide, load_sources
from histotransfer.wsi.svs import write_aperio_svs

MPP = 0.25  # a 40x scan


def benchmark_slide(pieces: int, *, artefacts: Sequence[str] = (), seed: int = 0) -> Path:
    """A 0.25 um/px Aperio slide of ``pieces`` tissue pieces (42 pieces: 43,617 x 37,386 px), with the
    sample cohort's ``artefacts`` (pen, fold, bubble) drawn on it."""
    suffix = "".join(f"-{a}" for a in artefacts) + (f"-seed{seed}" if seed else "")
    path = cache_dir() / "bench" / f"tiling-40x-{pieces}pieces{suffix}.svs"
    if not path.is_file():
        print(f"generating {path} (once) ...", flush=True)
        composed = compose_slide(
            load_sources(),
            np.random.default_rng(seed),
            mpp=MPP,
            tissue_pieces=pieces,
            lesion_fraction=None,
            artefacts=artefacts,
        )
        write_aperio_svs(path, composed.rgb, mpp=MPP)
    return path
