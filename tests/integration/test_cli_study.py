"""The command line on whole studies: `histotransfer run` on the small study (and its reuse), the
per-stage commands on real tissue, a three-class study; `report` on a finished study imports no torch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from histotransfer.cli import main
from histotransfer.io.manifest import read_manifest
from histotransfer.mil.crossval import MILResult
from tests.helpers import torch_free, write_csv


@pytest.mark.integration
def test_run_is_the_whole_study_and_reuses_what_is_done(small_study):
    proc, study, config = small_study.run, small_study.root, small_study.config
    assert f"cohort manifest: {study / 'cohort' / 'manifest.csv'}" in proc.stdout
    assert "tiles (h5 + QC png): 6 of 6 slide(s) ready" in proc.stdout
    assert "features efficientnet_lite0@blocks.3: 6 of 6 slide(s) ready" in proc.stdout
    assert "mil efficientnet_lite0@blocks.3: AUC " in proc.stdout
    assert f"onnx bundle: {study / 'onnx' / 'best'}" in proc.stdout
    assert f"report: {study / 'report' / 'index.html'}" in proc.stdout
    assert "onnx_ir" not in proc.stderr  # the exporter's pass-by-pass logging is silenced
    assert len(list((study / "tiles").glob("*.h5"))) == 6
    assert len(list((study / "features" / "efficientnet_lite0@blocks.3").glob("*.h5"))) == 6
    metrics = study / "mil" / "efficientnet_lite0@blocks.3" / "metrics.json"
    assert len(list((metrics.parent / "heatmaps").glob("*.png"))) == 2
    html = (study / "report" / "index.html").read_text()
    assert "<td>efficientnet_lite0@blocks.3</td>" in html
    assert "Tiling QC" in html
    assert 'href="../onnx/best/bundle.json"' in html  # the report links the deployable model
    assert "histotransfer predict" in (study / "report" / "summary.md").read_text()
    bundle = study / "onnx" / "best" / "bundle.json"
    before = metrics.stat().st_mtime_ns, bundle.stat().st_mtime_ns
    assert main(["run", "--config", str(config)]) == 0
    assert (metrics.stat().st_mtime_ns, bundle.stat().st_mtime_ns) == before  # every stage reused
    summary = (study / "features" / "efficientnet_lite0@blocks.3" / "summary.csv").read_text()
    assert summary.count(",skipped,") == 6
    assert main(["report", str(study)]) == 0
    assert 'href="../onnx/best/bundle.json"' in (study / "report" / "index.html").read_text()


@pytest.mark.integration
def test_extract_command(sample_cohort, tmp_path, capsys):
    assert main(["tile", str(sample_cohort), "--out", str(tmp_path / "tiles")]) == 0
    tiles, features = str(tmp_path / "tiles"), str(tmp_path / "features")
    args = [
        "extract",
        str(sample_cohort),
        "--tiles",
        tiles,
        "--encoder",
        "resnet18@layer1+random",
        "--out",
        features,
    ]
    code = main([*args, "--device", "cpu", "--backend", "torch", "--batch-size", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "encoder resnet18@layer1+random: 64-d, weights random (seed 0)" in out
    assert len(list((tmp_path / "features" / "resnet18@layer1+random").glob("*.h5"))) == 4


@pytest.mark.integration
def test_three_class_study_with_a_manifest_split_and_with_folds(tmp_path, capsys):
    """Two lesion types plus normal tissue, real pixels: the split column makes one fold (val slides
    are watched, never fitted), folds make a cross-validation; metrics are one-vs-rest and macro, the
    report draws a curve per class."""
    cohort = tmp_path / "cohort"
    easy = ["--tissue-pieces", "1", "--mpp", "0.5", "--lesion-fraction", "0.25", "--artefacts", "0"]
    args = ["sample-data", str(cohort), "--n-slides", "12", "--positive-fraction", "0.67"]
    assert main([*args, "--lesion-types", "solid", "papillary", *easy]) == 0
    rows = read_manifest(cohort / "manifest.csv")
    by_class: dict[str, list] = {}
    for row in rows:
        by_class.setdefault(row.label, []).append(row)
    assert sorted(by_class) == ["normal", "tumor-papillary", "tumor-solid"]
    split = {
        r.slide_id: ("train", "train", "val", "test")[i]
        for group in by_class.values()
        for i, r in enumerate(group)
    }
    manifest = write_csv(
        tmp_path / "split.csv",
        [
            {"slide_id": r.slide_id, "path": r.path, "label": r.label, "split": split[r.slide_id]}
            for r in rows
        ],
    )
    encoder = "efficientnet_lite0@blocks.3"
    assert main(["tile", str(manifest), "--out", str(tmp_path / "tiles")]) == 0
    features = ["--tiles", str(tmp_path / "tiles"), "--out", str(tmp_path / "features")]
    assert main(["extract", str(manifest), "--encoder", encoder, *features]) == 0
    train = ["--features", str(tmp_path / "features" / encoder), "--tiles", str(tmp_path / "tiles")]
    assert main(["train", str(manifest), *train, "--out", str(tmp_path / "split" / "mil")]) == 0
    result = MILResult.load(tmp_path / "split" / "mil" / encoder)
    assert result.metrics["classes"] == ["normal", "tumor-papillary", "tumor-solid"]
    assert [f["n_test"] for f in result.metrics["folds"]] == [3]
    history = json.loads((result.out_dir / "fold0" / "history.json").read_text())
    assert sorted(history["test"]) == sorted(s for s, part in split.items() if part == "test")
    assert all(h["val_loss"] is not None for h in history["history"])  # val slides are watched
    assert history["best_epoch"] == len(history["history"])  # selection: last
    cv = tmp_path / "cv"
    assert (
        main(["train", str(cohort / "manifest.csv"), *train, "--out", str(cv / "mil"), "--folds", "4"]) == 0
    )
    result = MILResult.load(cv / "mil" / encoder)
    y, probs, _ = result.oof_predictions()
    assert probs.shape == (12, 3)
    expected = np.mean([roc_auc_score(y == k, probs[:, k]) for k in range(3)])
    assert result.metrics["pooled"]["auc"]["value"] == pytest.approx(expected)
    assert result.metrics["localisation"]["n_slides"] == 8  # both lesion types have masks
    shutil.copytree(tmp_path / "tiles", cv / "tiles")
    assert main(["report", str(cv)]) == 0
    html = (cv / "report" / "index.html").read_text()
    assert "3 classes: AUC is the mean one-vs-rest AUC" in html
    assert (cv / "report" / "figures" / "roc.png").stat().st_size > 1000


@pytest.mark.integration  # reads the small study (a whole `histotransfer run`)
def test_report_imports_no_torch(small_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(small_study.root, study, ignore=shutil.ignore_patterns("report"))
    torch_free("report", str(study))
    assert (study / "report" / "index.html").is_file()
