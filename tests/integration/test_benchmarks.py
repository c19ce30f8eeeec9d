"""The benchmark scripts keep running (their numbers are read by people, never asserted)."""

import subprocess
import sys

import pytest

from tests.helpers import REPO

BENCHMARKS = REPO / "benchmarks"


@pytest.mark.integration
def test_bench_tiling_smoke():
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_tiling.py"),
            "--pieces",
            "1",
            "--small-slides",
            "1",
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ours/CLAM" in proc.stdout
    assert "run again with every slide current" in proc.stdout


@pytest.mark.integration
def test_bench_extract_smoke():
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_extract.py"),
            "--pieces",
            "1",
            "--encoder",
            "resnet18@layer1+random",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ONNX Runtime / torch: model-only" in proc.stdout


@pytest.mark.integration
def test_bench_onnx_smoke():
    args = ["--pieces", "1", "--encoder", "resnet18@layer1+random", "--batch-size", "4", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_onnx.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ORT/torch" in proc.stdout
    assert "end-to-end / model-only" in proc.stdout


@pytest.mark.integration
def test_bench_models_smoke():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_models.py"), "--model", "kaiko_vits16", "--seconds", "0.2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mid-cut/full" in proc.stdout
    assert "kaiko_vits16" in proc.stdout
