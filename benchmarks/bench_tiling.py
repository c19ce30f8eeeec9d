"""Tiler speed on a realistic 40x slide, side by side with a naive baseline, in one run.

The slide (>= 40,000 x 30,000 px at 0.25 um/px, real H&E pixels from the sample-cohort sources) is
generated once and cached. The tiler decides tissue from a low-resolution mask; the naive baseline
reads every candidate tile at full resolution and thresholds its saturation. Prints seconds per
slide, tiles per second, the speed-up, and how far the two tile sets agree.

    python benchmarks/bench_tiling.py [--pieces 42] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import openslide
from skimage.filters import threshold_otsu
from tqdm.auto import tqdm

from common import MPP, benchmark_slide
from histotransfer.config import TilingConfig
from histotransfer.manifest import SlideRecord
from histotransfer.wsi.slides import read_level_reduced, read_rgb, slide_info
from histotransfer.wsi.tiling import (
    candidate_coords,
    compute_tissue_mask,
    mask_source,
    slide_tile_geometry,
    tile_slide,
)
from histotransfer.wsi.tissue import saturation


def naive_tiles(path: Path, tiling: TilingConfig, threshold: int) -> np.ndarray:
    """Read every candidate tile at full resolution; keep those with enough saturated pixels."""
    with openslide.OpenSlide(str(path)) as slide:
        info = slide_info(slide, None, name=str(path))
        geo = slide_tile_geometry(info, tiling)
        candidates = candidate_coords(info, geo)
        keep = []
        for x, y in tqdm(candidates, desc="naive", unit="tile", leave=False):
            tile = read_rgb(slide, (x, y), geo.read_level, (geo.read_size_px, geo.read_size_px))
            keep.append((saturation(tile) > threshold).mean() >= tiling.min_tissue_fraction)
        return candidates[np.array(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=42, help="tissue pieces; 42 gives 43,617 x 37,386 px")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tiling = TilingConfig()
    path = benchmark_slide(args.pieces)
    with openslide.OpenSlide(str(path)) as slide:
        width, height = slide.dimensions
        info = slide_info(slide, None, name=str(path))
        mask = compute_tissue_mask(slide, info, tiling).tissue
        level, factor = mask_source(info, tiling.tissue.mask_mpp)
        low_sat = saturation(read_level_reduced(slide, level, factor))
    # The baseline thresholds at the same saturation level the tiler's Otsu step picks.
    threshold = max(int(threshold_otsu(low_sat)), tiling.tissue.min_saturation)
    record = SlideRecord("bench", str(path), "x", "bench")
    times, n_tiles = [], 0
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeat):
            start = time.perf_counter()
            n_tiles = tile_slide(record, out_dir=Path(out), tiling=tiling)["n_tiles"]
            times.append(time.perf_counter() - start)
        with h5py.File(Path(out) / "bench.h5") as f:
            tiler_coords = {tuple(c) for c in f["coords"][:]}
    tiler_s = statistics.median(times)
    start = time.perf_counter()
    naive = naive_tiles(path, tiling, threshold=threshold)
    naive_s = time.perf_counter() - start
    naive_coords = {tuple(c) for c in naive}
    jaccard = len(tiler_coords & naive_coords) / max(1, len(tiler_coords | naive_coords))
    print(
        f"slide: {width} x {height} px at {MPP} um/px "
        f"({path.stat().st_size / 2**20:.0f} MiB), tissue mask {mask.shape[1]} x {mask.shape[0]} px"
    )
    print(f"{'method':<28}{'s/slide':>10}{'tiles':>8}{'tiles/s':>10}")
    print(f"{'tiler (low-res mask)':<28}{tiler_s:>10.2f}{n_tiles:>8}{n_tiles / tiler_s:>10.0f}")
    print(f"{'naive (read every tile)':<28}{naive_s:>10.2f}{len(naive):>8}{len(naive) / naive_s:>10.0f}")
    print(f"speed-up tiler vs naive: {naive_s / tiler_s:.1f}x; tile-set agreement (Jaccard): {jaccard:.3f}")


if __name__ == "__main__":
    main()
