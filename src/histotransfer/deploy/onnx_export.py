"""Exporting to ONNX: encoders (uint8 tiles in, features out: normalisation travels with the model) and
the attention-MIL head (a bag of features in, class probabilities and attention out), with parity
measured against torch on the same inputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histotransfer.atomic import atomic_path
from histotransfer.deploy.bundle import (
    AGGREGATOR_INPUT,
    AGGREGATOR_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    Parity,
    session,
)
from histotransfer.errors import ExportError
from histotransfer.features.encoders import Encoder
from histotransfer.mil.model import AttentionMIL

log = logging.getLogger(__name__)
OPSET = 18
ONNX_MAX_BYTES = 2**31 - 2**24  # one protobuf file holds at most 2 GB; leave room for the graph
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # on max |ort - torch| / max |torch|


def _export(module: nn.Module, example: torch.Tensor, path: Path, *, names, dims, opset: int) -> None:
    import onnx

    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=[names[0]],
        output_names=list(names[1:]),
        dynamic_shapes={names[0]: dims},
        opset_version=opset,
        verbose=False,
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
        _export(module, example, tmp, names=names, dims={0: torch.export.Dim("batch", min=1)}, opset=opset)
        if fp16:
            _to_fp16(tmp)
    return Path(path)


def _to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


class AggregatorGraph(nn.Module):
    """The MIL head as deployed: softmax probabilities and attention, no training-only outputs."""

    def __init__(self, mil: AttentionMIL):
        super().__init__()
        self.mil = mil

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mil(features)  # features (n_tiles, dim)
        return torch.softmax(out.logits, dim=0), out.attention  # (n_classes,), (n_tiles,)


def export_aggregator(mil: AttentionMIL, path: str | Path, *, in_dim: int, opset: int = OPSET) -> Path:
    """Write the MIL head as ONNX with a dynamic bag length (1 tile up), atomically."""
    module = AggregatorGraph(mil.cpu().eval()).eval()
    example = torch.rand(17, in_dim)  # any size > 1: a size-1 example would fix the axis to 1
    with atomic_path(path) as tmp:
        names = (AGGREGATOR_INPUT, *AGGREGATOR_OUTPUTS)
        _export(module, example, tmp, names=names, dims={0: torch.export.Dim("tiles", min=1)}, opset=opset)
    return Path(path)


def measure_parity(
    expected: Sequence[np.ndarray], got: Sequence[np.ndarray], *, tolerance: float, inputs: str
):
    """Parity of two lists of outputs; max_rel is max |got - expected| over max |expected|."""
    max_abs = max(float(np.abs(g - e).max()) for e, g in zip(expected, got, strict=True))
    scale = max(float(np.abs(e).max()) for e in expected)
    return Parity(max_abs=max_abs, max_rel=max_abs / (scale + 1e-12), tolerance=tolerance, inputs=inputs)


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
    _check(parity, f"encoder {encoder.id}", path)
    return parity


def aggregator_parity(
    mil: AttentionMIL, path: Path, bags: Sequence[np.ndarray], *, tolerance: float
) -> Parity:
    """Probabilities and attention of float32 bags (n, dim) through torch and ONNX Runtime."""
    module = AggregatorGraph(mil.cpu().eval()).eval()
    sess = session(path, threads=torch.get_num_threads(), providers=["CPUExecutionProvider"])
    expected, got = [], []
    for bag in bags:
        with torch.inference_mode():
            expected += [t.numpy() for t in module(torch.from_numpy(bag))]
        got += sess.run(list(AGGREGATOR_OUTPUTS), {AGGREGATOR_INPUT: bag})
    sizes = ", ".join(str(len(b)) for b in bags)
    parity = measure_parity(expected, got, tolerance=tolerance, inputs=f"bags of {sizes} tiles")
    _check(parity, "the attention-MIL head", path)
    return parity


def _check(parity: Parity, what: str, path: Path) -> None:
    if not parity.max_rel <= parity.tolerance:  # also catches NaN
        raise ExportError(
            f"ONNX export of {what} disagrees with torch: relative error {parity.max_rel:.2e} > "
            f"{parity.tolerance:g} on {parity.inputs} ({path})"
        )
    log.info(
        "%s: ONNX parity %.2e (tolerance %g) on %s", what, parity.max_rel, parity.tolerance, parity.inputs
    )


def run_session(sess, tiles: np.ndarray) -> np.ndarray:
    """Features (n, dim) float32 of uint8 tiles (n, 3, h, w)."""
    return sess.run(None, {sess.get_inputs()[0].name: tiles})[0]
