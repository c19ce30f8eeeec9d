"""Feature extraction speed, measured side by side in one run.

For each backend (torch; ONNX Runtime where it applies) on the chosen device:
- model-only: random uint8 batches straight into the encoder (the ceiling);
- end-to-end: tiles read on the fly from a 40x slide (448 px read at level 0, resized to 224) by
  DataLoader workers, through the same encoder;
and their ratio, plus ONNX Runtime vs torch (model-only, same threads, same batch).

    python benchmarks/bench_extract.py [--encoder efficientnet_lite0] [--device auto] [--pieces 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import benchmark_slide
from histotransfer.core.config import TilingConfig
from histotransfer.features.encoders import build_encoder
from histotransfer.features.extraction import EngineSettings, encode_batches, extract_tiles, make_runner
from histotransfer.io.manifest import SlideRecord
from histotransfer.wsi.tiling import load_tiles, tile_slide


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(runner, encoder, n_tiles: int, batch_size: int, tile_px: int) -> float:
    batch = torch.randint(0, 256, (batch_size, 3, tile_px, tile_px), dtype=torch.uint8)
    if runner.device.type == "cuda":
        batch = batch.pin_memory()
    runner(batch)  # warm-up: cudnn autotuning, ONNX Runtime's first run
    _sync(runner.device)
    batches = [batch] * (n_tiles // batch_size)
    start = time.perf_counter()
    encode_batches(runner, batches, len(batches) * batch_size, encoder.dim, desc="model-only")
    _sync(runner.device)
    return len(batches) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoder", action="append", help="encoder id (repeatable); default efficientnet_lite0"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--pieces", type=int, default=12, help="tissue pieces of the benchmark slide")
    parser.add_argument("--backend", action="append", choices=["torch", "onnxruntime"], help="default: both")
    args = parser.parse_args()
    slide = benchmark_slide(args.pieces)
    with tempfile.TemporaryDirectory() as out:
        record = SlideRecord("bench", str(slide), "x", "bench")
        tile_slide(record, out_dir=Path(out), tiling=TilingConfig())
        tiles = load_tiles(Path(out) / "bench.h5")
    print(
        f"slide {slide.name}: {len(tiles.coords)} tiles, read {tiles.read_size_px} px at level "
        f"{tiles.read_level}, resized to {tiles.patch_size_px}; torch threads {torch.get_num_threads()}"
    )
    rows = []
    for encoder_id in args.encoder or ["efficientnet_lite0"]:
        encoder = build_encoder(encoder_id)
        for backend in args.backend or ("torch", "onnxruntime"):
            settings = EngineSettings.resolve(
                device=args.device, batch_size=args.batch_size, num_workers=args.num_workers, backend=backend
            )
            if backend == "onnxruntime" and settings.device.type == "cuda" and not _ort_cuda():
                print(f"{encoder_id}: onnxruntime offers no CUDAExecutionProvider here (onnxruntime-gpu)")
                continue
            runner = make_runner(encoder, settings)
            ceiling = model_only(runner, encoder, len(tiles.coords), settings.batch_size, tiles.patch_size_px)
            start = time.perf_counter()
            split: dict = {}
            extract_tiles(runner, encoder, slide, tiles, settings, split=split)
            e2e = len(tiles.coords) / (time.perf_counter() - start)
            if split:
                print(
                    f"{encoder_id} {backend}: reading {split['read_ms']:.2f} ms/tile on one thread, "
                    f"model {split['model_ms']:.2f} ms/tile on {split['cpus']} cores -> "
                    f"{split['readers']} reader thread(s)"
                )
            rows.append((encoder_id, backend, settings, ceiling, e2e))
    print(
        f"{'encoder':<26}{'backend':<13}{'device':<8}{'batch':>6}{'workers':>8}{'model-only':>12}"
        f"{'end-to-end':>12}{'e2e/model':>10}  (tiles/s)"
    )
    for encoder_id, backend, s, ceiling, e2e in rows:
        print(
            f"{encoder_id:<26}{backend:<13}{s.device.type:<8}{s.batch_size:>6}"
            f"{s.num_workers or 'auto'!s:>8}"
            f"{ceiling:>12.1f}{e2e:>12.1f}{e2e / ceiling:>10.2f}"
        )
    by_key = {(r[0], r[1]): r for r in rows}
    for encoder_id in args.encoder or ["efficientnet_lite0"]:
        if (encoder_id, "onnxruntime") in by_key and (encoder_id, "torch") in by_key:
            t, o = by_key[(encoder_id, "torch")], by_key[(encoder_id, "onnxruntime")]
            ratio_model, ratio_e2e = o[3] / t[3], o[4] / t[4]
            print(f"{encoder_id}: ONNX Runtime / torch: model-only {ratio_model:.2f}x, e2e {ratio_e2e:.2f}x")


if __name__ == "__main__":
    main()
