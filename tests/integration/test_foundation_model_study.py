"""A whole study of two pathology foundation models (shrunk, random weights in their published
layouts: tests/checkpoints.py) with a truncation sweep, fine-tuning, CKA, export and the report."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from histotransfer.core.architectures import ARCHS
from tests.checkpoints import random_model, shrink_foundation_models, write_published


@pytest.fixture
def small(monkeypatch):
    """Every foundation model shrunk (one catalogue dict, read by the registry and by encoders)."""
    shrink_foundation_models(monkeypatch)


FM_STUDY = """
output_dir: {out}
sample_data: {{n_slides: 6, tissue_pieces: 1, site_mpp: [0.5], lesion_fraction: 0.25, artefacts: 0.0}}
extraction:
  encoders:
    - {{id: phikon_v2, weights: {phikon}}}
    - {{id: phikon_v2@blocks.1, weights: {phikon}}}
    - {{id: phikon_v2@blocks.0, weights: {phikon}}}
    - {{id: virchow2, weights: {virchow}}}
mil: {{epochs: 3, folds: 3}}
evaluation: {{bootstrap: 100, heatmaps: 1}}
finetune: {{encoders: [phikon_v2@blocks.1], k: 4, epochs: 1, grad_checkpointing: true}}
cka: {{tiles: 32, batch_size: 16}}
"""


@pytest.mark.integration
def test_a_study_of_two_foundation_models_with_a_truncation_sweep(tmp_path, small, capsys):
    """The weights are tiny random files in the published layouts (Phikon-v2: a Hugging Face
    Dinov2Model, Virchow2: timm; each a model.safetensors in a folder, as their hubs have them), of the
    models shrunk to width 48 and depth 3: the real ones would take hours on a CPU. Everything else is
    the real study: extraction (ONNX Runtime), 3-fold MIL, fine-tuning, CKA, export and the report."""
    from histotransfer.cli import main

    phikon = write_published(tmp_path / "phikon-v2", "phikon_v2", random_model("phikon_v2")[1])
    virchow = write_published(tmp_path / "virchow2", "virchow2", random_model("virchow2", seed=2)[1])
    config = tmp_path / "study.yaml"
    config.write_text(FM_STUDY.format(out=tmp_path / "study", phikon=phikon, virchow=virchow))
    assert main(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    study = tmp_path / "study"
    for encoder_id, dim in [
        ("phikon_v2", 48),
        ("phikon_v2@blocks.1", 48),
        ("phikon_v2@blocks.0", 48),
        ("virchow2", 96),
    ]:
        assert f"features {encoder_id}: 6 of 6 slide(s) ready" in out
        assert f"mil {encoder_id}: AUC " in out
        with h5py.File(next((study / "features" / encoder_id).glob("*.h5"))) as f:
            assert f["features"].shape[1] == dim
            assert f.attrs["token_rule"] == ARCHS[encoder_id.split("@")[0]].token
            assert f.attrs["weights_source"].startswith("file:")
    assert "mil phikon_v2@blocks.1+ft: AUC " in out
    cka = json.loads((study / "cka" / "phikon_v2@blocks.1__phikon_v2@blocks.1+ft-fold0.json").read_text())
    assert cka["layers_a"] == ["blocks.0", "blocks.1"]
    assert np.isfinite(np.array(cka["matrix"])).all()
    html = (study / "report" / "index.html").read_text()
    assert "<td>virchow2</td>" in html
    assert "<td>phikon_v2@blocks.0</td>" in html
    assert "pathology foundation model · truncated" in html  # the report's family column
    assert (study / "report" / "figures" / "truncation.png").stat().st_size > 1000  # the sweep's curve
