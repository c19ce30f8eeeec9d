"""Tiling speed, ours vs a CLAM-equivalent baseline on the same slides, in one run.

Slides (generated once and cached): a 40x slide of 43,617 x 37,386 px (42 tissue pieces of real H&E
pixels) and six small 40x slides with pen marks, folds and bubbles.

- ours: ``tile_slide`` (tissue and ink mask, fold QC, the QC picture, the h5 with provenance), and the
  same without the QC picture (``tiling.qc_image: false``);
- CLAM-equivalent: what CLAM's ``create_patches_fp.py --seg --patch`` computes, written here with the
  same array libraries we use: the level nearest a 64x downsample read whole, HSV saturation, a 7-px
  median, Otsu, a 4-px closing, CLAM's area filter (at our minimum area), a grid kept where
  one of the four points around a tile's centre is tissue (CLAM's ``four_pt``), coords saved to h5.
  No QC picture, no ink or fold detection;
- read-only: reading the level alone, the floor under both.

Then the command itself (``histotransfer tile`` on all the slides, a fresh process): its wall time
minus our per-slide times is the fixed start-up cost. Prints seconds per slide, the ratio ours /
CLAM-equivalent, and how far the two tile sets agree (Jaccard).

    python benchmarks/bench_tiling.py [--repeat 3] [--pieces 42] [--small-slides 6]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import openslide
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.filters.rank import median

from common import benchmark_slide
from histotransfer.core.config import TilingConfig
from histotransfer.io.manifest import SlideRecord
from histotransfer.wsi.slides import read_rgb, slide_info
from histotransfer.wsi.tiling import candidate_coords, slide_tile_geometry, tile_slide

SMALL_SLIDES = [(3, ("pen",)), (4, ("fold",)), (5, ("bubble",)), (6, ("pen", "fold")), (4, ()), (6, ())]


def read_level(path: Path) -> np.ndarray:
    """The level CLAM segments: nearest a 64x downsample, read whole."""
    with openslide.OpenSlide(str(path)) as slide:
        level = slide.get_best_level_for_downsample(64)
        return read_rgb(slide, (0, 0), level, slide.level_dimensions[level])


def clam_equivalent(path: Path, tiling: TilingConfig, out: Path) -> set[tuple[int, int]]:
    """CLAM's segmentation and patching (see the module docstring); writes ``out`` and returns the coords."""
    with openslide.OpenSlide(str(path)) as slide:
        level = slide.get_best_level_for_downsample(64)
        downsample = slide.level_downsamples[level]
        rgb = read_rgb(slide, (0, 0), level, slide.level_dimensions[level])
        info = slide_info(slide, None, name=str(path))
    cmax = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    cmin = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    sat = ((cmax - cmin).astype(np.uint16) * 255 // np.maximum(cmax, 1)).astype(np.uint8)
    sat = median(sat, np.ones((7, 7), dtype=bool))  # CLAM: cv2.medianBlur(saturation, 7)
    tissue = ndimage.binary_closing(sat > threshold_otsu(sat), structure=np.ones((4, 4), dtype=bool))
    labels, _ = ndimage.label(tissue)
    areas = np.bincount(labels.ravel())
    # CLAM's area filter, at our minimum object area (its default, 100 patches of 512 px, is for 20x
    # resections and drops every piece of these slides)
    keep = areas >= tiling.tissue.min_object_um2 / (info.mpp * downsample) ** 2
    keep[0] = False
    tissue = keep[labels]
    geometry = slide_tile_geometry(info, tiling)
    candidates = candidate_coords(info, geometry)
    size = geometry.patch_size_level0
    inside = np.zeros(len(candidates), dtype=bool)
    for dx, dy in ((-1, -1), (-1, 1), (1, -1), (1, 1)):  # four_pt: a quarter tile around the centre
        x = ((candidates[:, 0] + size / 2 + dx * size / 4) / downsample).astype(np.int64)
        y = ((candidates[:, 1] + size / 2 + dy * size / 4) / downsample).astype(np.int64)
        x, y = np.clip(x, 0, tissue.shape[1] - 1), np.clip(y, 0, tissue.shape[0] - 1)
        inside |= tissue[y, x]
    coords = candidates[inside]
    with h5py.File(out, "w") as f:
        f.create_dataset("coords", data=coords)
    return {tuple(c) for c in coords.tolist()}


def median_time(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(path: Path, tiling: TilingConfig, out: Path) -> set[tuple[int, int]]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    tile_slide(SlideRecord("bench", str(path), "x", "bench"), out_dir=out, tiling=tiling)
    with h5py.File(out / "bench.h5") as f:
        return {tuple(c) for c in f["coords"][:].tolist()}


def command_wall(slides: list[Path], work: Path) -> float:
    """Wall time of ``histotransfer tile`` on the slides, from process start to exit."""
    manifest = work / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "path", "label"])
        writer.writerows([f"s{i}", str(p), "x"] for i, p in enumerate(slides))
    command = [str(Path(sys.executable).parent / "histotransfer"), "tile", str(manifest)]
    start = time.perf_counter()
    subprocess.run([*command, "--out", str(work / "tiles")], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pieces", type=int, default=42, help="tissue pieces of the large 40x slide")
    parser.add_argument("--small-slides", type=int, default=len(SMALL_SLIDES), help="how many small slides")
    args = parser.parse_args()
    tiling = TilingConfig()
    no_qc = tiling.model_copy(update={"qc_image": False})
    slides = [(f"40x, {args.pieces} pieces", benchmark_slide(args.pieces))]
    for pieces, artefacts in SMALL_SLIDES[: args.small_slides]:
        name = f"{pieces} pieces {'+'.join(artefacts) or 'clean'}"
        slides.append((name, benchmark_slide(pieces, artefacts=artefacts)))
    header = f"{'slide':<24}{'level 0 px':>14}{'tiles':>7}{'ours':>8}{'no QC':>8}{'CLAM-eq':>9}{'read':>7}"
    print(header + f"{'ours/CLAM':>11}{'Jaccard':>9}")
    totals = np.zeros(4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, path in slides:
            ours(path, tiling, work / "warm")  # page cache and first-call imports, for every method
            ours_s = median_time(lambda: ours(path, tiling, work / "a"), args.repeat)  # noqa: B023
            no_qc_s = median_time(lambda: ours(path, no_qc, work / "b"), args.repeat)  # noqa: B023
            clam_s = median_time(lambda: clam_equivalent(path, tiling, work / "c.h5"), args.repeat)  # noqa: B023
            read_s = median_time(lambda: read_level(path), args.repeat)  # noqa: B023
            ours_tiles = ours(path, tiling, work / "a")
            clam_tiles = clam_equivalent(path, tiling, work / "c.h5")
            jaccard = len(ours_tiles & clam_tiles) / max(1, len(ours_tiles | clam_tiles))
            with openslide.OpenSlide(str(path)) as slide:
                width, height = slide.dimensions
            totals += (ours_s, no_qc_s, clam_s, read_s)
            print(
                f"{name:<24}{f'{width}x{height}':>14}{len(ours_tiles):>7}{ours_s:>8.3f}{no_qc_s:>8.3f}"
                f"{clam_s:>9.3f}{read_s:>7.3f}{ours_s / clam_s:>10.2f}x{jaccard:>9.3f}"
            )
        o, n, c, r = totals / len(slides)
        print(f"{'mean per slide':<45}{o:>8.3f}{n:>8.3f}{c:>9.3f}{r:>7.3f}{o / c:>10.2f}x")
        wall = command_wall([p for _, p in slides], work)
        again = command_wall([p for _, p in slides], work)  # every slide current: start-up alone
    per_slide = totals[0]
    print(
        f"`histotransfer tile` on the {len(slides)} slides: {wall:.2f} s wall = start-up and cohort "
        f"bookkeeping {wall - per_slide:.2f} s + tiling {per_slide:.2f} s; run again with every "
        f"slide current: {again:.2f} s (goals: start-up < 0.5 s, 40x slide < 0.3 s, ours/CLAM-eq <= 1.2x)"
    )


if __name__ == "__main__":
    main()
