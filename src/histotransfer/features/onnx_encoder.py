"""Exporting to ONNX: encoders (uint8 tiles in, features out: normalisation travels with the model),
with parity measured against torch on the same inputs, and the torch-to-ONNX step every export uses
(the attention-MIL head's too: histotransfer.deploy.onnx_export)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histotransfer.core.errors import ExportError
from histotransfer.core.onnx_runtime import (
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    Parity,
    check_parity,
    measure_parity,
    session,
)
from histotransfer.features.encoders import Encoder
from histotransfer.io.atomic import atomic_path

OPSET = 18
ONNX_MAX_BYTES = 2**31 - 2**24  # one protobuf file holds at most 2 GB; leave room for the graph


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, *, names, dims, opset: int) -> None:
    """Write ``module`` as ONNX (dynamo export): input ``names[0]`` with dynamic ``dims``, outputs
    ``names[1:]``; checked with onnx.checker."""
    import onnx
    from onnxscript import opset18

    def sym_sqrt(x):  # a square root of a dimension (TransMIL's square of tiles): ONNX Sqrt
        return opset18.Sqrt(x)

    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=[names[0]],
        output_names=list(names[1:]),
        dynamic_shapes={names[0]: dims},
        opset_version=opset,
        verbose=False,
        custom_translation_table={torch._sym_sqrt: sym_sqrt},
    )
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def weights_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters: what an ONNX file of it must hold."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_encoder(
    encoder: Encoder,
    path: str | Path,
    *,
    tile_px: int = 224,
    opset: int = OPSET,
    fp16: bool = False,
    owned: bool = False,
) -> Path:
    """Write ``encoder`` as ONNX with a dynamic batch axis, atomically; checked with onnx.checker.

    ``fp16`` stores the weights and computes in float16 (for GPUs) while keeping uint8 in and
    float32 out, so callers do not change. ``owned``: ``path`` is a cache entry (replaced whatever it
    holds).
    """
    module = encoder.module.cpu().eval()
    weights = weights_bytes(module) // (2 if fp16 else 1)
    if weights > ONNX_MAX_BYTES:
        raise ExportError(
            f"{encoder.id} has {weights / 1e9:.1f} GB of weights: more than one ONNX file holds (2 GB); "
            "run it with backend torch (a cut at an earlier block, or --fp16, may fit)"
        )
    example = torch.randint(0, 256, (2, 3, tile_px, tile_px), dtype=torch.uint8)
    with atomic_path(path, owned=owned) as tmp:
        names = (ENCODER_INPUT, ENCODER_OUTPUT)
        dims = {0: torch.export.Dim("batch", min=1)}
        export_graph(module, example, tmp, names=names, dims=dims, opset=opset)
        if fp16:
            _to_fp16(tmp)
    return Path(path)


def _to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def encoder_parity(
    encoder: Encoder, path: Path, batches: Sequence[np.ndarray], *, tolerance: float, sess=None
) -> Parity:
    """Run uint8 batches (b, 3, p, p) through torch (fp32, CPU) and the exported file; ExportError when
    they disagree beyond ``tolerance``. ``sess``: the caller's session of ``path`` (default: a CPU one)."""
    module = encoder.module.cpu().eval()
    if sess is None:
        sess = session(path, threads=torch.get_num_threads(), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = [module(torch.from_numpy(b)).numpy() for b in batches]
    got = [sess.run(None, {ENCODER_INPUT: b})[0] for b in batches]
    sizes = ", ".join(str(len(b)) for b in batches)
    parity = measure_parity(expected, got, tolerance=tolerance, inputs=f"uint8 tile batches of {sizes}")
    check_parity(parity, f"encoder {encoder.id}", path)
    return parity
