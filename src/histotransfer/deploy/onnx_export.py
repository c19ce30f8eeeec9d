"""Exporting the attention-MIL head to ONNX (a bag of features in, class probabilities and attention
out), with parity measured against torch on the same inputs. Encoders: histotransfer.features.onnx_encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histotransfer.core.onnx_runtime import Parity, check_parity, measure_parity, session
from histotransfer.deploy.bundle import AGGREGATOR_INPUT, AGGREGATOR_OUTPUTS
from histotransfer.features.onnx_encoder import OPSET, export_graph
from histotransfer.io.atomic import atomic_path
from histotransfer.mil.model import MILHead


class AggregatorGraph(nn.Module):
    """The MIL head as deployed: softmax probabilities and attention, no training-only outputs."""

    def __init__(self, mil: MILHead):
        super().__init__()
        self.mil = mil

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mil(features)  # features (n_tiles, dim)
        return torch.softmax(out.logits, dim=0), out.attention  # (n_classes,), (n_tiles,)


def export_aggregator(mil: MILHead, path: str | Path, *, in_dim: int, opset: int = OPSET) -> Path:
    """Write the MIL head as ONNX with a dynamic bag length (1 tile up), atomically."""
    module = AggregatorGraph(mil.cpu().eval()).eval()
    example = torch.rand(17, in_dim)  # any size > 1: a size-1 example would fix the axis to 1
    with atomic_path(path) as tmp:
        names = (AGGREGATOR_INPUT, *AGGREGATOR_OUTPUTS)
        dims = {0: torch.export.Dim("tiles", min=1)}
        export_graph(module, example, tmp, names=names, dims=dims, opset=opset)
    return Path(path)


def aggregator_parity(mil: MILHead, path: Path, bags: Sequence[np.ndarray], *, tolerance: float) -> Parity:
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
    check_parity(parity, "the attention-MIL head", path)
    return parity
