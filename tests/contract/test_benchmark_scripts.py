"""The CKA benchmark script keeps running (its numbers are read by people, never asserted); the slower
scripts' smoke runs: tests/integration/test_benchmarks.py."""

import subprocess
import sys

from tests.helpers import REPO

BENCHMARKS = REPO / "benchmarks"


def test_bench_cka_smoke():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_cka.py"), "--n", "2048", "--d", "32", "--batch", "256"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "minibatch (unbiased HSIC)" in proc.stdout
    assert "full, Gram (n x n)" in proc.stdout
