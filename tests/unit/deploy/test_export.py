"""ONNX export and the torch-free predict path: parity, dynamic axes, the bundle's checks, predictions
equal to the torch model's, bad slides and bad bundles."""

import functools
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from histotransfer.assets import fetch_asset
from histotransfer.cli import EXIT_BAD_INPUT, EXIT_SLIDES_FAILED, main
from histotransfer.deploy.bundle import BUNDLE_FILE, ENCODER_FILE, load_bundle, read_spec
from histotransfer.deploy.export import best_result, choose_fold, export_study_model
from histotransfer.deploy.onnx_export import aggregator_parity, export_aggregator
from histotransfer.errors import BundleError, ExportError
from histotransfer.features.encoders import build_encoder
from histotransfer.features.extraction import TileReader
from histotransfer.features.onnx_encoder import encoder_parity, export_encoder
from histotransfer.mil.crossval import MILResult
from histotransfer.mil.model import AttentionMIL
from histotransfer.provenance import sealed_json
from histotransfer.wsi.tiling import load_tiles
from tests.helpers import SMALL_STUDY_ENCODER, write_csv


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
    from histotransfer.onnx_runtime import session

    return session(path, providers=["CPUExecutionProvider"])


def _weight_bytes(path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


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


@pytest.mark.parametrize(("attention", "patch_head"), [("paper", False), ("gated", True)])
def test_aggregator_parity_from_one_tile_to_ten_thousand(attention, patch_head, tmp_path):
    torch.manual_seed(0)
    model = AttentionMIL(48, 3, attention=attention, patch_head=patch_head).eval()
    rebuilt = AttentionMIL.from_state_dict(model.state_dict())  # what export loads from model.pt
    assert rebuilt.gated == (attention == "gated")
    path = export_aggregator(rebuilt, tmp_path / "aggregator.onnx", in_dim=48)
    rng = np.random.default_rng(0)
    bags = [np.abs(rng.standard_normal((n, 48))).astype(np.float32) for n in (1, 10_000, 33)]
    parity = aggregator_parity(model, path, bags, tolerance=1e-4)
    assert parity.max_rel <= 1e-4
    probs, attention_out = load_session(path).run(None, {"features": bags[1]})
    assert probs.shape == (3,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert attention_out.shape == (10_000,)
    assert attention_out.sum() == pytest.approx(1.0, abs=1e-4)


def test_from_state_dict_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="not an attention-MIL state_dict"):
        AttentionMIL.from_state_dict({"fc.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize(
    ("losses", "fold"),
    [
        ([(0.3, 0.10), (0.2, 0.50), (0.4, 0.01)], 1),  # validation losses decide when there are any
        ([(None, 0.10), (None, 0.05), (None, 0.30)], 1),  # else the kept epoch's training loss
        ([(None, 0.05), (None, 0.05)], 0),  # ties: the lower fold
    ],
)
def test_choose_fold_by_validation_else_training_loss(tmp_path, losses, fold):
    for k, (val, train) in enumerate(losses):
        history = [{"epoch": 1, "train_loss": 9.0, "val_loss": None if val is None else 9.0}]
        history.append({"epoch": 2, "train_loss": train, "val_loss": val})
        (tmp_path / f"fold{k}").mkdir()
        (tmp_path / f"fold{k}" / "history.json").write_text(
            sealed_json({"best_epoch": 2, "history": history})
        )
    chosen, loss = choose_fold(tmp_path)
    assert chosen == fold
    assert (loss.val_loss, loss.train_loss) == losses[fold]


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
def test_the_study_bundle_records_what_predict_needs(small_study):
    bundle = small_study.root / "onnx" / "best"
    spec = read_spec(bundle)
    mil_dir = small_study.root / "mil" / SMALL_STUDY_ENCODER
    assert spec.encoder.id == SMALL_STUDY_ENCODER
    assert spec.classes == ["normal", "tumor"]
    assert (spec.tiling.patch_size_px, spec.tiling.target_mpp) == (224, 0.5)
    assert spec.aggregator.fold == choose_fold(mil_dir)[0]
    assert spec.aggregator.val_loss is None  # selection: last holds out no validation slides
    assert spec.aggregator.train_loss == choose_fold(mil_dir)[1].train_loss
    assert spec.encoder.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.opset == 18
    assert spec.parity["encoder"].max_rel <= 1e-4
    assert spec.parity["aggregator"].inputs.startswith("bags of 1, 10000")
    assert spec.encoder.weights_sha256 == build_encoder(SMALL_STUDY_ENCODER).weights_sha256
    assert best_result([MILResult.load(mil_dir)]).encoder_id == SMALL_STUDY_ENCODER


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
def test_predict_equals_the_torch_model_and_imports_no_torch(small_study, tmp_path):
    study = small_study.root
    out = tmp_path / "pred"
    # torch is made unimportable: any `import torch` on this path raises ImportError
    code = (
        "import sys; sys.modules['torch'] = None; from histotransfer.cli import main; "
        f"rc = main(['predict', {str(study / 'cohort' / 'manifest.csv')!r}, "
        f"'--bundle', {str(study / 'onnx' / 'best')!r}, '--out', {str(out)!r}]); "
        "heavy = ('torch', 'torchvision', 'timm'); "
        "loaded = sorted(m for m, mod in sys.modules.items() if mod and m.split('.')[0] in heavy); "
        "print('heavy modules:', loaded); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy modules: []" in proc.stdout
    assert "predictions: 6 of 6 slide(s) ready" in proc.stdout
    assert len(list((out / "heatmaps").glob("*.png"))) == 6

    spec = read_spec(study / "onnx" / "best")
    encoder = build_encoder(spec.encoder.id)
    mil_dir = study / "mil" / spec.encoder.id
    head = AttentionMIL.from_state_dict(
        torch.load(mil_dir / f"fold{spec.aggregator.fold}" / "model.pt", weights_only=True)
    )
    rows = {r.split(",")[0]: r.split(",") for r in (out / "predictions.csv").read_text().splitlines()[1:]}
    for slide_id in ("sample-000", "sample-003"):
        tiles = load_tiles(out / "tiles" / f"{slide_id}.h5")
        reader = TileReader(tiles.slide_path, tiles)
        with torch.inference_mode():
            features = encoder.module(torch.stack([reader[i] for i in range(len(reader))]))
            result = head(features)
        expected = torch.softmax(result.logits, 0).numpy()
        with h5py.File(out / "slides" / f"{slide_id}.h5", "r") as f:
            np.testing.assert_allclose(f["probabilities"][:], expected, atol=1e-4)
            np.testing.assert_allclose(f["attention"][:], result.attention.numpy(), atol=1e-4)
            assert (f["coords"][:] == tiles.coords).all()
        assert float(rows[slide_id][-1]) == pytest.approx(float(expected[1]), abs=1e-4)
    # the bundle's fold predicted its own test slides during the study: same probability
    study_rows = [r.split(",") for r in (mil_dir / "predictions.csv").read_text().splitlines()[1:]]
    own = [r for r in study_rows if int(r[2]) == spec.aggregator.fold]
    assert own
    for r in own:
        assert float(rows[r[0]][-1]) == pytest.approx(float(r[-1]), abs=1e-4)
    # a second run reuses every slide
    assert main(["predict", str(study / "cohort" / "manifest.csv"), "--bundle", str(study / "onnx" / "best"),
                 "--out", str(out)]) == 0  # fmt: skip
    assert (out / "predictions.csv").read_text().count(",skipped,") == 6


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
def test_predict_isolates_bad_slides(small_study, tmp_path, capsys):
    study = small_study.root
    good = study / "cohort" / "slides" / "sample-000.svs"
    manifest = write_csv(
        tmp_path / "new.csv",
        [
            {"slide_id": "good", "path": str(good)},
            {"slide_id": "broken", "path": str(fetch_asset("unreadable_svs"))},
        ],
    )
    out = tmp_path / "pred"
    rc = main(["predict", str(manifest), "--bundle", str(study / "onnx" / "best"), "--out", str(out)])
    assert rc == EXIT_SLIDES_FAILED
    assert "broken: SlideError" in capsys.readouterr().err
    rows = (out / "predictions.csv").read_text()
    assert "good,done" in rows
    assert "broken,failed" in rows
    assert not (out / "slides" / "broken.h5").exists()
    # a single slide file works too; its id is the file name's stem
    rc = main(
        ["predict", str(good), "--bundle", str(study / "onnx" / "best"), "--out", str(tmp_path / "one")]
    )
    assert rc == 0
    assert (tmp_path / "one" / "slides" / "sample-000.h5").is_file()


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_corrupt_bundle_is_a_clear_error(bundle_copy, capsys):
    load_bundle(bundle_copy)  # intact
    data = (bundle_copy / ENCODER_FILE).read_bytes()
    (bundle_copy / ENCODER_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"encoder.onnx does not match bundle.json .*corrupt"):
        load_bundle(bundle_copy)
    rc = main(["predict", "x.svs", "--bundle", str(bundle_copy), "--out", str(bundle_copy.parent / "o")])
    assert rc == EXIT_BAD_INPUT
    assert "corrupt" in capsys.readouterr().err


def test_mismatched_or_incomplete_bundle_is_a_clear_error(bundle_copy, tmp_path):
    """bundle.json is checked against itself (any edit: test_lineage) and, sealed again as a buggy tool
    might write it, against the files it describes."""
    from histotransfer.deploy.bundle import BUNDLE_VERSION

    def write(spec: dict) -> None:
        (bundle_copy / BUNDLE_FILE).write_text(sealed_json(spec))

    spec = json.loads((bundle_copy / BUNDLE_FILE).read_text())
    spec["encoder"]["dim"] = 7  # bundle.json no longer describes these files
    write(spec)
    with pytest.raises(BundleError, match=r"output `features` has shape .*do not belong together"):
        load_bundle(bundle_copy)
    spec["format_version"] = 99
    write(spec)
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(bundle_copy)
    del spec["classes"]
    spec["format_version"] = BUNDLE_VERSION
    write(spec)
    with pytest.raises(BundleError, match="`classes`: Field required"):
        load_bundle(bundle_copy)
    (bundle_copy / BUNDLE_FILE).unlink()
    with pytest.raises(BundleError, match="not a finished bundle"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no bundle folder"):
        load_bundle(tmp_path / "nothing")


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
def test_failed_export_keeps_the_previous_bundle(small_study, tmp_path, monkeypatch):
    mil_dir = small_study.root / "mil" / SMALL_STUDY_ENCODER
    out = tmp_path / "onnx" / "mine"
    export = functools.partial(export_study_model, mil_dir, out=out, tiles_dir=small_study.root / "tiles")
    first = export(fold=1)
    assert not first.reused
    assert first.spec.aggregator.fold == 1
    assert export(fold=1).reused
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("histotransfer.deploy.export.TOLERANCE", {"fp32": -1.0, "fp16": -1.0})
    with pytest.raises(ExportError, match="disagrees with torch"):
        export(fold=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["mine"]  # no staging folder left
    with pytest.raises(ExportError, match="not for resnet18"):
        export(expect_encoder="resnet18")
    with pytest.raises(ExportError, match="fold 9 is not a fold"):
        export(fold=9)


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
def test_export_command(small_study, tmp_path, capsys):
    mil_dir = small_study.root / "mil" / SMALL_STUDY_ENCODER
    out = tmp_path / "cli-bundle"
    assert main(["export", "--mil", str(mil_dir), "--encoder", SMALL_STUDY_ENCODER, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"bundle {out}: {SMALL_STUDY_ENCODER}" in text
    assert "encoder parity vs torch: max rel" in text
    assert load_bundle(out).spec.encoder.id == SMALL_STUDY_ENCODER
    rc = main(["export", "--mil", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == EXIT_BAD_INPUT
