"""Kubeflow Pipelines under kfp.local: the study pipeline runs end to end (in .venv) on the small study's
cohort and makes its features, and the inference pipeline classifies slides with its bundle."""

import json
import subprocess
import sys

import pytest

from histotransfer.report.html import COMPARISONS_JSON, compared_metrics
from pipelines.launch import main as pipeline_main
from tests.helpers import REPO, SMALL_STUDY_ENCODER, TINY, assert_same_features


@pytest.mark.integration
def test_run_local_runs_the_whole_study_pipeline(small_study, tmp_path):
    """On the small study's cohort (a user's manifest), the pipeline's features are the CLI's."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    root = tmp_path / "kfp"
    manifest = small_study.root / "cohort" / "manifest.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "run-local", "--config", str(config),
         "--pipeline-root", str(root), "--param", "shards=2", "--param", f"manifest={manifest}"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"pipeline study finished; artifacts under {root}" in proc.stdout
    run = next(root.iterdir())
    tiles = run / "merge-shards" / "merged" / "tiles"
    assert len(list(tiles.glob("*.h5"))) == 6  # two shards merged
    summary = (tiles / "summary.csv").read_text().splitlines()
    assert len(summary) == 7
    assert len(list(run.glob("for-loop-1-iteration-*"))) == 2
    features = run / "merge-shards-2" / "merged" / "features" / SMALL_STUDY_ENCODER
    assert_same_features(features, small_study.root / "features" / SMALL_STUDY_ENCODER, slides=6)
    bundle = run / "export-step" / "bundle" / "onnx" / "best" / "bundle.json"
    assert json.loads(bundle.read_text())["encoder"]["id"].startswith(SMALL_STUDY_ENCODER)
    assert list((run / "cka-step" / "comparison" / "cka").glob("*.json"))
    page = (run / "report-step" / "report").read_text()
    assert f"<td>{SMALL_STUDY_ENCODER}+ft</td>" in page
    assert 'src="data:image/png;base64,' in page  # one self-contained page for the KFP UI
    assert "Deployable model (ONNX)" in (run / "report-step" / "summary").read_text()
    metrics = json.loads(
        (next(run.glob("for-loop-3-iteration-0")) / "train-mil" / "executor_output.json").read_text()
    )
    assert "auc" in metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert "confusionMatrix" in metrics["artifacts"]["classification"]["artifacts"][0]["metadata"]
    # the paired comparison with the best as KFP Metrics: the numbers of the report's table
    report = json.loads((run / "report-step" / "executor_output.json").read_text())
    logged = report["artifacts"]["compared"]["artifacts"][0]["metadata"]
    rows = json.loads((run / "report-step" / "report_dir" / "report" / COMPARISONS_JSON).read_text())["rows"]
    assert len(rows) == 1  # the encoder and its fine-tuned copy
    expected = {f"{e}/{k}": v for e, numbers in compared_metrics(rows).items() for k, v in numbers.items()}
    assert logged == pytest.approx(expected)
    assert f"{rows[0]['other']}/auc_diff_vs_best" in logged


@pytest.mark.integration
def test_inference_pipeline_runs_locally_on_a_bundle(small_study, tmp_path, capsys):
    bundle = small_study.root / "onnx" / "best"
    manifest = small_study.root / "cohort" / "manifest.csv"
    args = ["run-local", "--pipeline", "inference", "--pipeline-root", str(tmp_path / "kfp")]
    assert pipeline_main([*args, "--param", f"bundle_uri={bundle}", "--param", f"slides={manifest}"]) == 0
    assert "pipeline inference finished" in capsys.readouterr().out
    step = next((tmp_path / "kfp").iterdir()) / "predict-step"
    rows = (step / "predictions" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 7
    assert all(",done," in r for r in rows[1:])
    assert (step / "summary").read_text().startswith("# Predictions")
