"""Every registered foundation model's speed on this machine, measured side by side in one run.

For each model, the real architecture with random weights (speed does not depend on their values):
- model-only tiles/s through torch at the model's input size (fp32 on a CPU, bf16 autocast on a GPU,
  where the batch is the largest of --batch-size, halved until it fits);
- a cut at the middle block against the full network (truncation saves the blocks it skips);
- ONNX Runtime against torch on the CPU, for models up to --ort-max-params (exporting a ViT-g takes
  minutes and 10+ GB).
Each measurement runs batches for about --seconds after one warm-up batch.

    python benchmarks/bench_models.py [--model uni --model conch ...] [--device auto] [--seconds 6]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from histotransfer.core.architectures import ARCHS
from histotransfer.core.onnx_runtime import run_session, session
from histotransfer.features.encoders import build_encoder
from histotransfer.features.extraction import EngineSettings, TorchRunner
from histotransfer.features.onnx_encoder import export_encoder

FOUNDATION_MODELS = [a for a, spec in ARCHS.items() if spec.published_file]


def _timed(run, batch: torch.Tensor | np.ndarray, seconds: float, device: torch.device) -> float:
    """tiles/s of ``run`` on ``batch``, after one warm-up call, over about ``seconds``."""
    run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        run(batch)
        n += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def _torch_speed(encoder, settings: EngineSettings, batch_size: int, seconds: float) -> tuple[float, int]:
    runner = TorchRunner(encoder, settings)
    size = encoder.input_size
    batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    speed = _timed(runner, batch, seconds, settings.device)
    return speed, runner.max_batch or batch_size


def _ort_speed(encoder, batch_size: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.onnx"
        export_encoder(encoder, path, tile_px=encoder.input_size)
        sess = session(path, providers=["CPUExecutionProvider"])
        size = encoder.input_size
        batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8)
        return _timed(lambda b: run_session(sess, b), batch, seconds, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="architecture (repeatable); default: all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="default: 4 on a CPU, 256 on a GPU")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--ort-max-params", type=float, default=100e6)
    args = parser.parse_args()
    settings = EngineSettings.resolve(device=args.device, backend="torch")
    cuda = settings.device.type == "cuda"
    batch_size = args.batch_size or (256 if cuda else 4)
    print(
        f"device {settings.device} ({settings.precision}), batch {batch_size}, "
        f"{torch.get_num_threads()} torch threads; random weights of each real architecture"
    )
    header = "model            params  dim   input  tiles/s   batch  mid-cut/full  ONNX RT/torch"
    print(header + "\n" + "-" * len(header))
    for arch in args.model or FOUNDATION_MODELS:
        spec = ARCHS[arch]
        encoder = build_encoder(f"{arch}+random")
        params = sum(p.numel() for p in encoder.module.model.parameters())
        full, fitted = _torch_speed(encoder, settings, batch_size, args.seconds)
        ort = ""
        if not cuda and params <= args.ort_max_params:  # the same encoder, exported
            ort = f"{_ort_speed(encoder, batch_size, args.seconds) / full:.2f}x"
        del encoder  # before the cut copy is built: two ViT-g do not fit beside each other everywhere
        gc.collect()
        middle = spec.cuts[len(spec.cuts) // 2 - 1]
        cut = build_encoder(f"{arch}@{middle}+random")
        cut_speed, _ = _torch_speed(cut, settings, batch_size, args.seconds / 2)
        del cut
        gc.collect()
        print(
            f"{arch:<16} {params / 1e6:>5.0f}M  {spec.dim:<5} {spec.input_size:<5}  {full:>7.2f}  "
            f"{fitted:>5}  {cut_speed / full:>5.2f}x @{middle:<10} {ort:>6}",
            flush=True,
        )


if __name__ == "__main__":
    main()
