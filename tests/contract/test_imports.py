"""What the library and its commands import: commands that build no encoder run with torch and timm
unimportable (tests.helpers.torch_free); the library imports and runs with kfp and the pipelines
package unimportable (`histotransfer pipeline` is a plugin)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import torch_free


@pytest.mark.slow
def test_sample_data_tile_and_encoders_import_no_torch(tmp_path):
    torch_free(
        "sample-data", str(tmp_path / "cohort"), "--n-slides", "2", "--tissue-pieces", "1", "--artefacts", "0"
    )
    proc = torch_free("tile", str(tmp_path / "cohort" / "manifest.csv"), "--out", str(tmp_path / "tiles"))
    assert "tiles: 2 of 2 slide(s) ready" in proc.stdout
    assert "blocks.3, blocks.4" in torch_free("encoders").stdout
    # a config naming an encoder is validated without torch too
    config = tmp_path / "c.yaml"
    config.write_text("extraction: {encoders: [{id: resnet50@layer3}]}\n")
    torch_free(
        "tile",
        str(tmp_path / "cohort" / "manifest.csv"),
        "--out",
        str(tmp_path / "t2"),
        "--config",
        str(config),
    )


@pytest.mark.slow
def test_library_never_imports_kfp_and_the_pipeline_command_is_a_plugin(tmp_path):
    """Every library module imports, and every library command runs, with kfp and the pipelines
    package impossible to import; `histotransfer pipeline` comes from its entry point, from any folder."""
    script = """
import importlib, pkgutil, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kfp", "pipelines", "components"):
            raise ImportError(f"the library imported {name}")
sys.meta_path.insert(0, Refuse())
import histotransfer
for info in pkgutil.walk_packages(histotransfer.__path__, "histotransfer."):
    importlib.import_module(info.name)
from histotransfer.cli import main
assert main(["encoders"]) == 0
assert main(["pipeline", "compile", "--help"]) == 2  # the plugin cannot load here: a clear exit 2
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs the pipelines package and kfp" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run-local" in proc.stdout
