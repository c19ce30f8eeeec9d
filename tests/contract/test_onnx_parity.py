"""ONNX parity: an exported encoder (fp32 and fp16) and an exported attention-MIL head give torch's
outputs within tolerance, for any batch size and bag size (dynamic axes)."""

import numpy as np
import pytest
import torch

from histotransfer.core.errors import ExportError
from histotransfer.deploy.onnx_export import aggregator_parity, export_aggregator
from histotransfer.features.encoders import build_encoder
from histotransfer.features.onnx_encoder import encoder_parity, export_encoder
from histotransfer.mil.model import AGGREGATORS, build_head, load_head


@pytest.mark.parametrize(
    "encoder_id",
    [
        "resnet18+random",
        "efficientnet_lite0@blocks.1",
        # the two slowest exports (6 s each) run in `make test` only, to keep `make test-fast` under 3 min
        pytest.param("densenet121@denseblock3+random", marks=pytest.mark.integration),
        pytest.param("efficientnet_lite0", marks=pytest.mark.integration),
    ],
)
def test_encoder_parity_and_dynamic_batch(encoder_id, tmp_path):
    encoder = build_encoder(encoder_id)
    path = export_encoder(encoder, tmp_path / "encoder.onnx", tile_px=96)
    batches = [np.random.default_rng(n).integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for n in (1, 7)]
    parity = encoder_parity(encoder, path, batches, tolerance=1e-4)
    assert parity.max_rel <= 1e-4
    assert parity.inputs == "uint8 tile batches of 1, 7"
    session = load_session(path)
    batch_axis = session.get_inputs()[0].shape[0]
    assert isinstance(batch_axis, str)  # symbolic: any batch size
    assert session.get_outputs()[0].shape[1] == encoder.dim


def load_session(path):
    from histotransfer.core.onnx_runtime import session

    return session(path, providers=["CPUExecutionProvider"])


def _weight_bytes(path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.slow
def test_fp16_encoder_keeps_its_interface(tmp_path):
    encoder = build_encoder("efficientnet_lite0@blocks.1")
    fp32 = export_encoder(encoder, tmp_path / "fp32.onnx", tile_px=64)
    fp16 = export_encoder(encoder, tmp_path / "fp16.onnx", tile_px=64, fp16=True)
    # weights stored in half precision (file sizes would also count the graph's metadata, source paths)
    assert _weight_bytes(fp16) < 0.6 * _weight_bytes(fp32)
    tiles = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    parity = encoder_parity(encoder, fp16, [tiles], tolerance=1e-2)
    assert 0 < parity.max_rel <= 1e-2  # not bit-equal: it really computes in float16
    with pytest.raises(ExportError, match="disagrees with torch"):
        encoder_parity(encoder, fp16, [tiles], tolerance=1e-9)
    out = load_session(fp16).run(None, {"tiles": tiles})[0]
    assert out.dtype == np.float32


@pytest.mark.parametrize(("kind", "patch_head"), [(kind, i % 2 == 1) for i, kind in enumerate(AGGREGATORS)])
def test_aggregator_parity_from_one_tile_to_ten_thousand(kind, patch_head, tmp_path):
    torch.manual_seed(0)
    model = build_head(kind, 48, 3, patch_head=patch_head).eval()
    rebuilt = load_head(model.state_dict())  # what export loads from model.pt
    assert rebuilt.kind == kind
    path = export_aggregator(rebuilt, tmp_path / "aggregator.onnx", in_dim=48)
    rng = np.random.default_rng(0)
    big = 2_000 if kind == "transmil" else 10_000  # exact self-attention: memory grows with n^2
    sizes = (1, big, 33, 2, 17 * 17 + 1)  # squares and not: TransMIL pads its tokens to a square
    bags = [np.abs(rng.standard_normal((n, 48))).astype(np.float32) for n in sizes]
    parity = aggregator_parity(model, path, bags, tolerance=1e-4)
    assert parity.max_rel <= 1e-4
    probs, attention_out = load_session(path).run(None, {"features": bags[1]})
    assert probs.shape == (3,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert attention_out.shape == (big,)
    assert attention_out.sum() == pytest.approx(1.0, abs=1e-4)
    assert attention_out.sum() == pytest.approx(1.0, abs=1e-4)
