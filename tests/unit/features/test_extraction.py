import shutil

import h5py
import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from histotransfer.core.config import TilingConfig
from histotransfer.features.encoders import build_encoder
from histotransfer.features.extraction import EngineSettings, extract_cohort
from histotransfer.io.manifest import read_manifest
from histotransfer.wsi.svs import write_aperio_svs
from histotransfer.wsi.tiling import load_tiles, tile_cohort
from tests.helpers import GOLDEN_MPP, GOLDEN_SIZE, GOLDEN_TISSUE, synthetic_slide_rgb, write_csv

CPU = EngineSettings.resolve(device="cpu", batch_size=16, num_workers=2, backend="torch")
ORT = EngineSettings.resolve(device="cpu", batch_size=16, num_workers=2)  # auto on CPU: onnxruntime


ENCODER = "resnet18@layer2+random"


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(ENCODER)


@pytest.fixture
def tiled(sample_cohort, tmp_path):
    """Two real-tissue slides at 0.5 um/px (read as they are) and one at 0.25 um/px (read 448 px,
    resized to 224), tiled."""
    rgb = synthetic_slide_rgb(GOLDEN_SIZE, [GOLDEN_TISSUE])
    golden = write_aperio_svs(tmp_path / "golden40x.svs", rgb, mpp=GOLDEN_MPP)
    rows = [
        {"slide_id": r.slide_id, "path": r.path, "label": r.label} for r in read_manifest(sample_cohort)[:2]
    ]
    rows.append({"slide_id": "golden40x", "path": str(golden), "label": "x"})
    records = read_manifest(write_csv(tmp_path / "m.csv", rows))
    tile_cohort(records, out_dir=tmp_path / "tiles", tiling=TilingConfig())
    return records, tmp_path / "tiles"


def _reference_tile(path: str, tiles, index: int, tmp_path) -> torch.Tensor:
    """Read one tile independently of the engine, round-trip it through a lossless PNG."""
    x, y = (int(v) for v in tiles.coords[index])
    with openslide.OpenSlide(path) as slide:
        size = tiles.read_size_px
        image = slide.read_region((x, y), tiles.read_level, (size, size)).convert("RGB")
    if size != tiles.patch_size_px:  # the area filter: each output pixel the rounded mean of a block
        p, f = tiles.patch_size_px, size // tiles.patch_size_px
        blocks = np.asarray(image).reshape(p, f, p, f, 3).astype(np.int64).sum(axis=(1, 3))
        image = Image.fromarray(((blocks + f * f // 2) // (f * f)).astype(np.uint8))
    png = tmp_path / f"tile-{index}.png"
    image.save(png)
    return torch.from_numpy(np.asarray(Image.open(png)).copy()).permute(2, 0, 1)


def test_cpu_defaults_to_onnxruntime():
    assert (ORT.backend, ORT.precision, CPU.backend) == ("onnxruntime", "fp32", "torch")


@pytest.mark.slow
@pytest.mark.parametrize("settings", [CPU, ORT], ids=["torch", "onnxruntime"])
def test_on_the_fly_features_equal_features_of_saved_lossless_tiles(tiled, encoder, tmp_path, settings):
    records, tiles_dir = tiled
    out = tmp_path / "features" / ENCODER
    result = extract_cohort(records, tiles_dir=tiles_dir, out_dir=out, encoder=encoder, settings=settings)
    assert not result.failed
    for record in records:
        tiles = load_tiles(tiles_dir / f"{record.slide_id}.h5")
        with h5py.File(out / f"{record.slide_id}.h5") as f:
            np.testing.assert_array_equal(f["coords"][:], tiles.coords)  # aligned with the tiles file
            features = f["features"][:]
            assert features.shape == (len(tiles.coords), 128)
            assert f.attrs["weights_sha256"] == encoder.weights_sha256
            assert f.attrs["encoder_id"] == ENCODER
            assert f.attrs["backend"] == settings.backend
        picks = np.random.default_rng(0).choice(
            len(tiles.coords), size=min(6, len(tiles.coords)), replace=False
        )
        batch = torch.stack([_reference_tile(record.path, tiles, int(i), tmp_path) for i in picks])
        with torch.no_grad():
            reference = encoder.module.cpu()(batch).numpy()
        np.testing.assert_allclose(features[picks], reference, rtol=1e-4, atol=1e-4)
        assert (tiles.read_size_px != tiles.patch_size_px) == (record.slide_id == "golden40x")


def test_worker_count_and_batch_size_do_not_change_features(tiled, encoder, tmp_path):
    records, tiles_dir = tiled
    a = EngineSettings.resolve(device="cpu", batch_size=7, num_workers=0, backend="torch")
    extract_cohort(records[:1], tiles_dir=tiles_dir, out_dir=tmp_path / "a", encoder=encoder, settings=a)
    extract_cohort(records[:1], tiles_dir=tiles_dir, out_dir=tmp_path / "b", encoder=encoder, settings=CPU)
    name = f"{records[0].slide_id}.h5"
    with h5py.File(tmp_path / "a" / name) as fa, h5py.File(tmp_path / "b" / name) as fb:
        np.testing.assert_allclose(fa["features"][:], fb["features"][:], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_failing_slide_is_isolated_and_resume_skips(tiled, encoder, tmp_path):
    records, tiles_dir = tiled
    rows = [{"slide_id": r.slide_id, "path": r.path, "label": r.label} for r in records]
    for name in ("truncated", "zeroed", "untiled"):
        shutil.copy(records[0].path, tmp_path / f"{name}.svs")
        rows.append({"slide_id": name, "path": str(tmp_path / f"{name}.svs"), "label": "x"})
    cohort = read_manifest(write_csv(tmp_path / "m2.csv", rows))
    tile_cohort(
        [r for r in cohort if r.slide_id in ("truncated", "zeroed")], out_dir=tiles_dir, tiling=TilingConfig()
    )
    data = bytearray((tmp_path / "truncated.svs").read_bytes())
    (tmp_path / "truncated.svs").write_bytes(data[: len(data) // 3])  # damaged after tiling: unopenable
    n = len(data)
    data[n // 20 : n * 3 // 5] = bytes(n * 3 // 5 - n // 20)  # opens, but tiles fail to decode in a worker
    (tmp_path / "zeroed.svs").write_bytes(bytes(data))
    out = tmp_path / "features" / ENCODER
    result = extract_cohort(cohort, tiles_dir=tiles_dir, out_dir=out, encoder=encoder, settings=CPU)
    status = {o.slide_id: o for o in result.outcomes}
    assert status["truncated"].reason.startswith("SlideError: ")
    assert "not a slide format OpenSlide can open" in status["truncated"].reason
    assert "cannot read the tile at" in status["zeroed"].reason
    assert "Traceback" not in status["zeroed"].reason  # one line, not a worker's traceback
    assert "no tiles file" in status["untiled"].reason
    assert [status[r.slide_id].status for r in records] == ["done"] * len(records)
    enc_dir = out
    assert not any((enc_dir / f"{name}.h5").exists() for name in ("truncated", "zeroed", "untiled"))
    assert not list(enc_dir.glob("*.partial"))
    again = extract_cohort(records, tiles_dir=tiles_dir, out_dir=out, encoder=encoder, settings=CPU)
    assert {o.status for o in again.outcomes} == {"skipped"}
    tile_cohort(records[:1], out_dir=tiles_dir, tiling=TilingConfig(min_tissue_fraction=0.9))  # tiles change
    third = extract_cohort(records, tiles_dir=tiles_dir, out_dir=out, encoder=encoder, settings=CPU)
    assert [o.status for o in third.outcomes] == ["done"] + ["skipped"] * (len(records) - 1)


@pytest.mark.slow
def test_a_damaged_or_mismatched_onnx_cache_entry_is_rebuilt(tmp_path, monkeypatch, caplog):
    """Regression: a damaged or foreign file in the ONNX encoder cache failed every slide on every
    rerun (a protobuf or a broadcast error); it is now checked (sha256, inputs and outputs, parity)
    and exported again with a warning."""
    from histotransfer.features.extraction import OrtRunner

    monkeypatch.setenv("HISTOTRANSFER_CACHE", str(tmp_path))
    settings = EngineSettings.resolve(device="cpu", backend="onnxruntime", num_workers=0)
    encoder = build_encoder("resnet18@layer1+random")
    tiles = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    reference = OrtRunner(encoder, settings)(tiles)
    (entry,) = (tmp_path / "onnx").glob("resnet18@layer1+random-*-64px.onnx")
    digest = entry.with_name(entry.name + ".sha256")
    assert digest.is_file()

    entry.write_bytes(entry.read_bytes()[:2000])  # damaged (a disk error, a killed copy)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(OrtRunner(encoder, settings)(tiles), reference)
    assert "is unusable, exporting it again: its content" in caplog.text

    small = entry.with_name(entry.name.replace("-64px", "-32px"))  # another export, digest and all
    shutil.copy(entry, small)
    shutil.copy(digest, small.with_name(small.name + ".sha256"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert OrtRunner(encoder, settings)(tiles[:, :, :32, :32]).shape == (3, 64)
    assert "input `tiles` is tensor(uint8) ['batch', 3, 64, 64]" in caplog.text
    caplog.clear()
    assert OrtRunner(encoder, settings)(tiles[:, :, :32, :32]).shape == (3, 64)  # the rebuilt entry
    assert "unusable" not in caplog.text


def test_a_batch_too_big_for_the_device_is_split_until_it_fits(encoder, monkeypatch, caplog):
    """A ViT-g at the GPU's default batch can exceed a card's memory; the runner halves the batch (and
    keeps the size that fitted) instead of failing the slide. Simulated: batches over 5 tiles 'OOM'."""
    from histotransfer.features.extraction import TorchRunner

    runner = TorchRunner(encoder, EngineSettings.resolve(device="cpu", backend="torch"))
    real = runner.module.forward
    sizes = []

    def small_memory(x):
        sizes.append(len(x))
        if len(x) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(runner.module, "forward", small_memory)
    tiles = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    with caplog.at_level("WARNING"):
        out = runner(tiles)
    assert runner.max_batch == 4
    assert sizes == [16, 8, 4, 4, 4, 4]
    torch.testing.assert_close(out, real(tiles))
    assert "does not fit" in caplog.text
    sizes.clear()
    runner(tiles[:9])  # later batches are split up front
    assert sizes == [4, 4, 1]


def test_auto_runs_encoders_too_big_for_one_onnx_file_with_torch(encoder, monkeypatch):
    import histotransfer.features.extraction as extraction
    from histotransfer.core.errors import ExportError
    from histotransfer.features.onnx_encoder import export_encoder

    auto = EngineSettings.resolve(device="cpu")
    assert auto.backend == "onnxruntime"
    assert auto.for_encoder(encoder) is auto  # small: ONNX Runtime, as chosen
    monkeypatch.setattr(extraction, "ONNX_MAX_BYTES", 1000)  # as if the encoder were a ViT-g
    assert auto.for_encoder(encoder).backend == "torch"
    named = EngineSettings.resolve(device="cpu", backend="onnxruntime")
    assert named.for_encoder(encoder).backend == "onnxruntime"  # asked for by name: kept
    monkeypatch.setattr("histotransfer.features.onnx_encoder.ONNX_MAX_BYTES", 1000)
    with pytest.raises(ExportError, match="more than one ONNX file holds"):
        export_encoder(encoder, "/nonexistent/never-written.onnx")


def test_tiles_off_the_models_resolution_are_warned_about_once(tiled, tmp_path, monkeypatch, caplog):
    """CTransPath's authors cut tiles at 1 um/px; these are at 0.5: extraction says so, once."""
    from histotransfer.core.architectures import ARCHS
    from histotransfer.features.registry import shrunk

    monkeypatch.setitem(ARCHS, "ctranspath", shrunk(ARCHS["ctranspath"]))
    records, tiles_dir = tiled
    fm = build_encoder("ctranspath+random")
    settings = EngineSettings.resolve(device="cpu", backend="torch", batch_size=16)
    with caplog.at_level("WARNING"):
        result = extract_cohort(
            records, tiles_dir=tiles_dir, out_dir=tmp_path / "f", encoder=fm, settings=settings
        )
    assert not result.failed
    warnings = [r for r in caplog.records if "its authors extract them at 1.00 um/px" in r.getMessage()]
    assert len(warnings) == 1
    assert "tiles at 0.50 um/px" in warnings[0].getMessage()
    with h5py.File(next((tmp_path / "f").glob("*.h5"))) as f:
        assert f.attrs["model_mpp"] == 1.0
        assert f.attrs["token_rule"] == "mean"
