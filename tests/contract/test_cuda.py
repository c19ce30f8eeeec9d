"""The GPU path: bf16 torch extraction and ONNX Runtime's CUDA provider agree with the CPU.

Skipped without a CUDA device (CI has none); benchmarks/gpu.sh runs them when a GPU is lent.
"""

import numpy as np
import pytest
import torch

from histotransfer.core.config import TilingConfig
from histotransfer.features.encoders import build_encoder
from histotransfer.features.extraction import EngineSettings, extract_tiles, make_runner
from histotransfer.io.manifest import read_manifest
from histotransfer.wsi.tiling import load_tiles, tile_cohort

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@pytest.mark.parametrize("encoder_id", ["resnet50@layer3+random", "phikon@blocks.5+random"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_gpu_features_agree_with_the_cpu(sample_cohort, tmp_path, backend, encoder_id):
    if backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime without CUDAExecutionProvider (install onnxruntime-gpu)")
    record = read_manifest(sample_cohort)[0]
    tile_cohort([record], out_dir=tmp_path, tiling=TilingConfig())
    tiles = load_tiles(tmp_path / f"{record.slide_id}.h5")
    encoder = build_encoder(encoder_id)  # a CNN cut, and a ViT-B cut (Phikon's architecture)
    cpu = EngineSettings.resolve(device="cpu", backend="torch")
    gpu = EngineSettings.resolve(device="cuda", backend=backend)
    assert gpu.precision == ("bf16" if backend == "torch" else "fp32")
    reference = extract_tiles(make_runner(encoder, cpu), encoder, record.path, tiles, cpu)
    features = extract_tiles(make_runner(encoder, gpu), encoder, record.path, tiles, gpu)
    assert features.shape == reference.shape
    assert np.isfinite(features).all()
    assert _cosine(features, reference).min() > (0.99 if backend == "torch" else 0.9999)
