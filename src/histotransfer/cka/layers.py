"""Layer-by-layer CKA between two encoders on the same tiles: ``cka/{a}__{b}.json`` and a heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from histotransfer.cka.measures import MinibatchCKA
from histotransfer.core.architectures import ARCHS
from histotransfer.features.encoders import Encoder, block_modules
from histotransfer.features.extraction import TileReader
from histotransfer.io.atomic import write_text_atomic
from histotransfer.io.layout import slide_file
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.marks import mark
from histotransfer.io.provenance import sealed_json
from histotransfer.plots import cka_matrix
from histotransfer.wsi.slides import local_slide_path
from histotransfer.wsi.tiling import load_tiles


@dataclass(frozen=True)
class CKAResult:
    matrix: np.ndarray  # (layers_a, layers_b)
    layers_a: list[str]
    layers_b: list[str]
    n_examples: int


def sample_tiles(
    records: Sequence[SlideRecord], tiles_dir: Path, *, n_tiles: int, seed: int
) -> ConcatDataset:
    """``n_tiles`` tiles drawn uniformly from all tiles of the cohort (seeded), read on the fly."""
    readers = [
        TileReader(local_slide_path(r.path), load_tiles(slide_file(tiles_dir, r.slide_id))) for r in records
    ]
    sizes = np.array([len(r) for r in readers])
    n_tiles = min(n_tiles, int(sizes.sum()))
    picks = np.sort(np.random.default_rng(seed).choice(int(sizes.sum()), size=n_tiles, replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, reader in enumerate(readers):
        local = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if len(local):
            parts.append(Subset(reader, local.tolist()))
    return ConcatDataset(parts)


class _Recorder:
    """Forward hooks that keep each named block's output pooled as a cut there pools it: global
    average pooling for CNNs, the final norm and the token rule for transformers; (batch, features)."""

    def __init__(self, encoder: Encoder, blocks: dict[str, torch.nn.Module]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.pool = encoder.module.pool
        last = ARCHS[encoder.id.arch].cuts[-1]
        self.handles = [m.register_forward_hook(self._hook(name, name == last)) for name, m in blocks.items()]

    def _hook(self, name: str, final: bool):
        def hook(_module, _inputs, output):
            self.outputs[name] = self.pool(output, final=final).float()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def layer_cka(a: Encoder, b: Encoder, tiles: ConcatDataset, *, batch_size: int, device: str) -> CKAResult:
    """The layers x layers linear CKA matrix of two encoders on the same tiles (minibatch, unbiased)."""
    blocks_a, blocks_b = block_modules(a.module.model, a.id.arch), block_modules(b.module.model, b.id.arch)
    estimator = MinibatchCKA(len(blocks_a), len(blocks_b))
    rec_a, rec_b = _Recorder(a, blocks_a), _Recorder(b, blocks_b)
    module_a, module_b = a.module.to(device).eval(), b.module.to(device).eval()
    loader = DataLoader(tiles, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=0)
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="cka", unit="batch", leave=False):
                x = batch.to(device)
                module_a(x)
                module_b(x)
                estimator.update(
                    [rec_a.outputs[n].cpu() for n in blocks_a], [rec_b.outputs[n].cpu() for n in blocks_b]
                )
    finally:
        rec_a.close()
        rec_b.close()
    return CKAResult(estimator.value(), list(blocks_a), list(blocks_b), estimator.examples)


def write_cka(
    json_path: Path,
    png_path: Path,
    name_a: str,
    name_b: str,
    result: CKAResult,
    made_from: dict | None = None,
) -> tuple[Path, Path]:
    """The comparison as JSON (matrix, layer names, sample size, method, lineage ``made_from``) and as a
    heatmap PNG (the study's ``cka/{a}__{b}.json`` and ``.png``: StudyLayout.cka_files)."""
    payload = {
        "a": name_a,
        "b": name_b,
        "layers_a": result.layers_a,
        "layers_b": result.layers_b,
        "matrix": result.matrix.round(6).tolist(),
        "n_examples": result.n_examples,
        "method": "linear CKA, minibatch unbiased HSIC (Nguyen, Raghu & Kornblith 2021); each layer pooled "
        "as a cut there is (GAP; transformers: final norm and token rule)",
    }
    if made_from is not None:
        payload["lineage"] = made_from
    json_path = write_text_atomic(Path(json_path), sealed_json(mark(payload)))
    png_path = cka_matrix(png_path, result.matrix, result.layers_a, result.layers_b, name_a, name_b)
    return json_path, png_path
