"""A cohort on paper: tiles, bytes and hours per stage on N nodes, computed from measured rates.

The default rates are this repository's measurements on one 2-core CPU node (benchmarks/README.md);
pass your own (a GPU's, from benchmarks/gpu.sh) with --rate. Tiling and extraction shard over slides
(the study pipeline's `shards`, one node each); fine-tuning runs one task per encoder whose folds run
one after another, each fine-tuning and then extracting the whole cohort again with its encoder.

    python benchmarks/sizing.py [--slides 10000] [--tiles-per-slide 10000] [--nodes 1 10 100]
        [--encoder resnet50@layer3] [--rate extract=66 --rate finetune=13.5 --rate tile=0.34]
"""

from __future__ import annotations

import argparse

# Measured on 2 cores (benchmarks/README.md): extraction end to end and fine-tuning (forward +
# backward) in tiles/s; tiling in s per 40x slide of 43,533 x 37,314 px; command start-up in s.
MEASURED = {
    "efficientnet_lite0": {"extract": 236.0, "finetune": 38.0, "dim": 1280},
    "resnet50@layer3": {"extract": 66.0, "finetune": 13.5, "dim": 1024},
    "resnet18": {"extract": 115.0, "finetune": 33.0, "dim": 512},
}
TILE_S, STARTUP_S = 0.34, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--tiles-per-slide", type=int, default=10_000, help="224 px at 0.5 um/px: ~1.25 cm2")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--encoder", default="resnet50@layer3", choices=sorted(MEASURED))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--k", type=int, default=64, help="fine-tuning tiles per slide (the paper)")
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (the paper)")
    parser.add_argument(
        "--rate", action="append", default=[], help="tile=S/slide, extract=, finetune= tiles/s"
    )
    args = parser.parse_args()
    rates = {"tile": TILE_S, **MEASURED[args.encoder]}
    for item in args.rate:
        key, _, value = item.partition("=")
        rates[key] = float(value)
    tiles = args.slides * args.tiles_per_slide
    feature_bytes = tiles * rates["dim"] * 4
    train_slides = args.slides * (args.folds - 1) // args.folds
    tuned_tiles = args.folds * args.epochs * args.k * train_slides
    print(
        f"{args.slides:,} slides x {args.tiles_per_slide:,} tiles = {tiles / 1e6:,.0f} M tiles; "
        f"{args.encoder} features ({rates['dim']:.0f} float32 per tile): "
        f"{feature_bytes / 1e12:.2f} TB per encoder ({feature_bytes / args.slides / 1e6:.0f} MB per slide); "
        f"coords {tiles * 16 / 1e9:.1f} GB"
    )
    print(
        f"rates per node: tiling {rates['tile']} s/slide, extraction {rates['extract']:g} tiles/s, "
        f"fine-tuning {rates['finetune']:g} tiles/s"
    )
    hours = {
        "tile (sharded)": lambda n: (args.slides * rates["tile"] / n + STARTUP_S) / 3600,
        "extract, per encoder (sharded)": lambda n: tiles / rates["extract"] / n / 3600,
        f"fine-tune, {args.folds} folds x {args.epochs} epochs x k={args.k} (one task)": lambda n: (
            tuned_tiles / rates["finetune"] / 3600
        ),
        f"re-extract with each fold's encoder ({args.folds}x, in that task)": lambda n: (
            args.folds * tiles / rates["extract"] / 3600
        ),
    }
    print(f"{'stage':<62}" + "".join(f"{f'{n} node(s)':>14}" for n in args.nodes) + "   (hours)")
    for name, fn in hours.items():
        print(f"{name:<62}" + "".join(f"{fn(n):>14,.1f}" for n in args.nodes))


if __name__ == "__main__":
    main()
