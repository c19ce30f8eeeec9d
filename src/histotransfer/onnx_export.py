"""Exporting encoders to ONNX (uint8 tiles in, features out: normalisation travels with the model)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from histotransfer.atomic import atomic_path
from histotransfer.encoders import Encoder

log = logging.getLogger(__name__)
OPSET = 18


def export_encoder(encoder: Encoder, path: str | Path, *, tile_px: int = 224, opset: int = OPSET) -> Path:
    """Write ``encoder`` as ONNX with a dynamic batch axis, atomically; checked with onnx.checker."""
    import onnx

    module = encoder.module.cpu().eval()
    example = torch.randint(0, 256, (2, 3, tile_px, tile_px), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["tiles"],
            output_names=["features"],
            dynamic_shapes={"tiles": {0: batch}},
            opset_version=opset,
            verbose=False,
        )
        program.save(str(tmp))
        onnx.checker.check_model(str(tmp))
    return Path(path)


def ort_session(path: str | Path, *, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session; ``threads`` caps intra-op threads (None: runtime default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


def run_session(session, tiles: np.ndarray) -> np.ndarray:
    """Features (n, dim) float32 of uint8 tiles (n, 3, h, w)."""
    return session.run(None, {session.get_inputs()[0].name: tiles})[0]
