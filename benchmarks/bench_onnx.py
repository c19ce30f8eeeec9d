"""ONNX Runtime vs torch eager, measured side by side in one run.

1. Encoders, model-only: the same uint8 batch through torch (eager, inference mode, channels_last as
   the extraction engine runs it) and through the
   exported encoder.onnx in ONNX Runtime, at the same number of threads (1, then every core).
2. The attention-MIL head on a 10,000-tile bag, torch vs ONNX Runtime.
3. `histotransfer predict` end to end (tiling, reading tiles from a 40x slide, encoder, head,
   heatmap) vs the encoder's model-only rate: what deployment costs beyond the network.

    python benchmarks/bench_onnx.py [--encoder ID ...] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import benchmark_slide
from histotransfer.core.config import TilingConfig
from histotransfer.core.onnx_runtime import session
from histotransfer.deploy.bundle import AggregatorInfo, load_bundle
from histotransfer.deploy.inference import predict_cohort
from histotransfer.deploy.onnx_export import AggregatorGraph, export_aggregator
from histotransfer.deploy.packaging import write_bundle
from histotransfer.features.encoders import build_encoder
from histotransfer.features.onnx_encoder import OPSET, export_encoder
from histotransfer.io.manifest import SlideRecord
from histotransfer.mil.model import AttentionMIL

DEFAULT_ENCODERS = ("efficientnet_lite0", "resnet18+random", "densenet121@denseblock3+random")


def rate(fn, n_items: int, repeats: int) -> float:
    """Items per second of ``fn`` (best of ``repeats`` after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n_items / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def encoder_rows(encoder_ids, batch_size: int, repeats: int, tmp: Path):
    cores = os.cpu_count() or 1
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, 224, 224), dtype=np.uint8)
    rows = []
    for encoder_id in encoder_ids:
        encoder = build_encoder(encoder_id)
        module = encoder.module.eval().to(memory_format=torch.channels_last)  # as the extraction engine
        path = export_encoder(encoder, tmp / f"{encoder_id}.onnx", tile_px=224)
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            sess = session(path, threads=threads, providers=["CPUExecutionProvider"])
            tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)

            def run_torch(m=module, t=tensor):
                with torch.inference_mode():
                    m(t)

            t_rate = rate(run_torch, batch_size, repeats)
            o_rate = rate(lambda s=sess: s.run(None, {"tiles": batch}), batch_size, repeats)
            rows.append((encoder_id, threads, t_rate, o_rate))
    torch.set_num_threads(cores)
    return rows


def aggregator_row(repeats: int, tmp: Path, dim: int = 1280, n_tiles: int = 10_000):
    torch.manual_seed(0)
    head = AttentionMIL(dim, 2).eval()
    path = export_aggregator(head, tmp / "aggregator.onnx", in_dim=dim)
    bag = np.abs(np.random.default_rng(0).standard_normal((n_tiles, dim))).astype(np.float32)
    graph, tensor = AggregatorGraph(head).eval(), torch.from_numpy(bag)
    sess = session(path, providers=["CPUExecutionProvider"])

    def run_torch():
        with torch.inference_mode():
            graph(tensor)

    return rate(run_torch, 1, repeats), rate(lambda: sess.run(None, {"features": bag}), 1, repeats)


def predict_row(encoder_id: str, model_only: float, pieces: int, tmp: Path):
    """End-to-end predict on one 40x slide through a bundle of ``encoder_id`` and an untrained head."""
    encoder = build_encoder(encoder_id)
    torch.manual_seed(0)
    head = AttentionMIL(encoder.dim, 2).eval()
    bundle_dir = tmp / "bundle"
    info = AggregatorInfo(mil_dir="(benchmark: untrained head)", fold=0, val_loss=None, kind="abmil")
    write_bundle(
        bundle_dir,
        encoder=encoder,
        head=head,
        classes=["normal", "tumor"],
        tiling=TilingConfig(),
        aggregator=info,
        probes=None,
        precision="fp32",
        opset=OPSET,
        source_hash="benchmark",
    )
    bundle = load_bundle(bundle_dir)
    slide = benchmark_slide(pieces)
    record = SlideRecord("bench", str(slide), "", "bench")
    start = time.perf_counter()
    result = predict_cohort([record], bundle, out_dir=tmp / "pred")
    seconds = time.perf_counter() - start
    outcome = result.outcomes[0]
    if outcome.status != "done":
        raise RuntimeError(f"predict failed on the benchmark slide: {outcome.reason}")
    n_tiles = int(outcome.stats["n_tiles"])
    return n_tiles, seconds, n_tiles / seconds, model_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoder", action="append", help=f"repeatable; default {', '.join(DEFAULT_ENCODERS)}"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pieces", type=int, default=4, help="tissue pieces of the predict benchmark slide")
    args = parser.parse_args()
    encoder_ids = args.encoder or list(DEFAULT_ENCODERS)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rows = encoder_rows(encoder_ids, args.batch_size, args.repeats, tmp)
        print(f"\nencoders, model-only, CPU, batch {args.batch_size} of 224 px uint8 tiles (tiles/s)")
        print(f"{'encoder':<34}{'threads':>8}{'torch':>10}{'onnxruntime':>13}{'ORT/torch':>11}")
        for encoder_id, threads, t_rate, o_rate in rows:
            print(f"{encoder_id:<34}{threads:>8}{t_rate:>10.1f}{o_rate:>13.1f}{o_rate / t_rate:>10.2f}x")
        t_agg, o_agg = aggregator_row(args.repeats, tmp)
        print("\nattention-MIL head, one bag of 10,000 tiles x 1280 features (bags/s)")
        print(f"torch {t_agg:.1f}   onnxruntime {o_agg:.1f}   ORT/torch {o_agg / t_agg:.2f}x")
        first = encoder_ids[0]
        cores = os.cpu_count() or 1
        model_only = next(o for e, t, _, o in rows if e == first and t == cores)
        n_tiles, seconds, e2e, ceiling = predict_row(first, model_only, args.pieces, tmp)
        print(f"\nhistotransfer predict, {first}, one 40x slide ({n_tiles} tiles), torch-free path")
        print(
            f"end-to-end {seconds:.1f} s = {e2e:.1f} tiles/s; encoder model-only {ceiling:.1f} tiles/s; "
            f"end-to-end / model-only {e2e / ceiling:.2f}"
        )


if __name__ == "__main__":
    main()
