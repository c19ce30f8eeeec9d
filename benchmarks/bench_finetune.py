"""Top-k fine-tuning speed: tiles read once and kept decoded vs read from the slide every epoch.

Bags of k tiles from slides of real H&E pixels (40x, read 448 px and reduced to 224), the encoder
and an attention head trained end to end for a few epochs. Prints the one-time read, each epoch's
tiles/s (forward + backward), and what reading the bags again in every epoch (the path before issue
17) would have added, measured by reading them once more.

    python benchmarks/bench_finetune.py [--encoder efficientnet_lite0+random] [--k 16] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import benchmark_slide
from histotransfer.core.config import FinetuneConfig, TilingConfig
from histotransfer.core.cpus import available_cpus
from histotransfer.features.encoders import build_encoder
from histotransfer.finetune.tuning import Bag, finetune, read_bag
from histotransfer.io.manifest import SlideRecord
from histotransfer.mil.model import AttentionMIL
from histotransfer.wsi.tiling import load_tiles, tile_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="efficientnet_lite0+random")
    parser.add_argument("--k", type=int, default=16, help="tiles per bag")
    parser.add_argument("--slides", type=int, default=6, help="bags (slides of 3 to 8 pieces)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    bags = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.slides):
            path = benchmark_slide(3 + i % 6, seed=i)
            record = SlideRecord(f"s{i}", str(path), "x", f"s{i}")
            tile_slide(record, out_dir=Path(out), tiling=TilingConfig())
            tiles = load_tiles(Path(out) / f"s{i}.h5")
            pick = np.random.default_rng(i).choice(
                len(tiles.coords), min(args.k, len(tiles.coords)), replace=False
            )
            subset = tiles.subset(pick)
            bags.append(Bag(record.slide_id, str(path), subset, i % 2, np.zeros(len(pick))))
    encoder = build_encoder(args.encoder)
    cfg = FinetuneConfig(k=args.k, epochs=args.epochs, lr=1e-4, patience=None)
    device = torch.device(args.device)
    started = time.perf_counter()
    result = finetune(encoder, AttentionMIL(encoder.dim, 2), bags, [], n_classes=2, cfg=cfg, device=device)
    total = time.perf_counter() - started
    start = time.perf_counter()
    for bag in bags:
        read_bag(bag, readers=available_cpus())
    read_again = time.perf_counter() - start
    n = result.read["tiles"]
    print(f"{args.encoder} on {device}: {len(bags)} bags x {args.k} tiles = {n} tiles, {args.epochs} epochs")
    print(
        f"read once: {result.read['seconds']:.2f} s ({n / result.read['seconds']:.0f} tiles/s), "
        f"kept decoded: {result.read['mib']:.0f} MiB"
    )
    for h in result.history:
        print(f"epoch {h['epoch']}: {h['tiles_per_s']:.1f} tiles/s (forward + backward)")
    before = total + (args.epochs - 1) * read_again
    print(
        f"fine-tuning {total:.2f} s; reading every epoch would take {before:.2f} s: "
        f"{before / total:.2f}x (one read of the bags: {read_again:.2f} s)"
    )


if __name__ == "__main__":
    main()
