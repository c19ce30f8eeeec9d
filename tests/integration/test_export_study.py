"""Export and predict on the small study (a whole `histotransfer run`): the bundle records what predict
needs, predictions equal the torch model's with torch unimportable, bad slides fail alone, a failed
export keeps the previous bundle, the export command."""

import functools
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from histotransfer.cli import EXIT_BAD_INPUT, EXIT_SLIDES_FAILED, main
from histotransfer.core.errors import ExportError
from histotransfer.deploy.bundle import load_bundle, read_spec
from histotransfer.deploy.packaging import best_result, choose_fold, export_study_model
from histotransfer.features.encoders import build_encoder
from histotransfer.features.extraction import TileReader
from histotransfer.io.assets import fetch_asset
from histotransfer.mil.crossval import MILResult
from histotransfer.mil.model import AttentionMIL, load_head
from histotransfer.wsi.tiling import load_tiles
from tests.helpers import SMALL_STUDY_ENCODER, write_csv


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
    monkeypatch.setattr("histotransfer.deploy.packaging.TOLERANCE", {"fp32": -1.0, "fp16": -1.0})
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


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
@pytest.mark.parametrize("kind", ["transmil", "max"])
def test_any_head_trains_exports_and_predicts_what_its_torch_model_says(small_study, tmp_path, kind):
    """`train --aggregator KIND` on the study's features, `export` of it, `predict` on the cohort: the
    bundle names the head, and predict's probabilities and tile scores are the saved torch head's on
    the study's features of the same tiles."""
    study = small_study.root
    manifest, tiles = study / "cohort" / "manifest.csv", study / "tiles"
    features = study / "features" / SMALL_STUDY_ENCODER
    mil = tmp_path / "mil"
    train = ["train", str(manifest), "--features", str(features), "--out", str(mil), "--tiles", str(tiles)]
    assert main([*train, "--aggregator", kind, "--epochs", "3", "--folds", "2"]) == 0
    bundle = tmp_path / "bundle"
    assert (
        main(["export", "--mil", str(mil / SMALL_STUDY_ENCODER), "--out", str(bundle), "--tiles", str(tiles)])
        == 0
    )
    spec = read_spec(bundle)
    assert spec.aggregator.kind == kind
    out = tmp_path / "pred"
    assert main(["predict", str(manifest), "--bundle", str(bundle), "--out", str(out), "--no-heatmaps"]) == 0
    state = torch.load(
        mil / SMALL_STUDY_ENCODER / f"fold{spec.aggregator.fold}" / "model.pt", weights_only=True
    )
    head = load_head(state)
    assert head.kind == kind
    for path in sorted((out / "slides").glob("*.h5")):
        with h5py.File(path, "r") as got, h5py.File(features / path.name, "r") as ours:
            np.testing.assert_array_equal(got["coords"][:], ours["coords"][:])
            with torch.inference_mode():
                expected = head(torch.from_numpy(ours["features"][:]))
            np.testing.assert_allclose(got["probabilities"][:], torch.softmax(expected.logits, 0), atol=1e-3)
            np.testing.assert_allclose(got["attention"][:], expected.attention, rtol=1e-2, atol=1e-5)
