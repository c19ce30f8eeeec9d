"""Tiles of a slide in uint8 batches for a model on the CPU, read on threads while the model runs.

On a CPU the tiles and the model share the cores. Reader *processes* (DataLoader workers) each want a
core and fight the model's threads for it; reader *threads* cost no copies between processes, and
OpenSlide, imagecodecs and Pillow all release the GIL while they work. ``measured_batches`` splits
the CPUs between the two from what it measures on the slide's first batches: the model keeps every
core (its threads sleep rather than spin while waiting), and as many reader threads run as the share
of each tile's CPU time that reading takes, in cores, rounded up (benchmarks/bench_extract.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from histotransfer.core.cpus import available_cpus
from histotransfer.wsi.regions import open_regions
from histotransfer.wsi.slides import open_slide
from histotransfer.wsi.tiling import TileSet, read_tile

log = logging.getLogger(__name__)


def tile_batches(
    slide_path: Path, tiles: TileSet, *, batch_size: int, readers: int, start: int = 0
) -> Iterator[np.ndarray]:
    """uint8 batches (b, 3, p, p) in tile order from tile ``start`` on; ``readers`` threads (each with
    its own slide handle) read the next batch while the caller works on this one; 0: the caller's
    thread reads each batch when it asks for it."""
    n = len(tiles.coords)
    if readers == 0:
        slide = open_slide(slide_path)
        regions = open_regions(slide, slide_path)
        try:
            for first in range(start, n, batch_size):
                batch = [read_tile(regions, tiles, i) for i in range(first, min(n, first + batch_size))]
                yield np.stack(batch).transpose(0, 3, 1, 2)
        finally:
            regions.close()
            slide.close()
        return
    local = threading.local()
    handles = []
    lock = threading.Lock()

    def read(index: int) -> np.ndarray:
        if not hasattr(local, "regions"):
            slide = open_slide(slide_path)
            local.regions = open_regions(slide, slide_path)
            with lock:
                handles.extend([local.regions, slide])
        return read_tile(local.regions, tiles, index)

    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="tile-reader") as pool:

        def submit(first: int) -> list:
            return [pool.submit(read, i) for i in range(first, min(n, first + batch_size))]

        pending: list = []
        try:
            pending = submit(start)
            for first in range(start, n, batch_size):
                current, pending = pending, submit(first + batch_size)  # read ahead one batch
                yield np.stack([f.result() for f in current]).transpose(0, 3, 1, 2)  # (b, 3, p, p)
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            for handle in handles:
                handle.close()


def reader_threads(read_s: float, model_s: float, cpus: int) -> int:
    """Reader threads for ``cpus`` cores when reading a tile takes ``read_s`` seconds on one thread and
    the model takes ``model_s`` seconds of wall time per tile on all of them: reading's share of the
    CPU time per tile, in cores, rounded up (at least 1, at most ``cpus``)."""
    share = read_s / (read_s + model_s * cpus)
    return max(1, min(cpus, math.ceil(cpus * share - 1e-9)))


def measured_batches(
    slide_path: Path,
    tiles: TileSet,
    *,
    batch_size: int,
    readers: int | None = None,
    cpus: int | None = None,
    split: dict | None = None,
) -> Iterator[np.ndarray]:
    """Like ``tile_batches``; with ``readers`` None, the first two batches are read here, in this
    thread, timing the reading and (from the time the caller holds the second) the model, and the
    rest on ``reader_threads`` threads. ``split``, when given, receives what was measured and chosen."""
    n, cpus = len(tiles.coords), cpus or available_cpus()
    first = 0
    if readers is None:
        inline = tile_batches(slide_path, tiles, batch_size=batch_size, readers=0)
        read_s = model_s = 0.0
        try:
            for probe in range(2):
                started = time.perf_counter()
                batch = next(inline, None)
                if batch is None:
                    return
                read_s = (time.perf_counter() - started) / len(batch)
                handed = time.perf_counter()
                yield batch
                if probe == 1:  # the first batch warms the model up; the second is its speed
                    model_s = (time.perf_counter() - handed) / len(batch)
                first += len(batch)
        finally:
            inline.close()  # closes its slide handle
        readers = reader_threads(read_s, model_s, cpus)
        log.info(
            "%s: reading %.2f ms/tile on one thread, model %.2f ms/tile on %d cores: %d reader thread(s)",
            tiles.slide_id,
            read_s * 1e3,
            model_s * 1e3,
            cpus,
            readers,
        )
        if split is not None:
            split.update(read_ms=read_s * 1e3, model_ms=model_s * 1e3, cpus=cpus, readers=readers)
    if first < n:
        yield from tile_batches(slide_path, tiles, batch_size=batch_size, readers=readers, start=first)
