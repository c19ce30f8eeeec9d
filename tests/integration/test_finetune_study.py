"""Fine-tuning inside a whole study's cross-validation (`run_study`): each fold fine-tunes on its own
training slides' top-k attention tiles and never sees its test fold; the per-stage command reuses it."""

import json

import h5py
import numpy as np
import pytest
import torch

from histotransfer.features.encoders import build_encoder

STUDY = """
output_dir: {out}
sample_data: {{n_slides: 6, tissue_pieces: 1, seed: 3}}
extraction:
  encoders: [{{id: efficientnet_lite0@blocks.1}}]
mil: {{epochs: 3, folds: 3}}
finetune: {{encoders: [efficientnet_lite0@blocks.1], k: 3, epochs: 2, lr: 0.0001}}
cka: {{tiles: 64, batch_size: 16, fold: 1}}
evaluation: {{bootstrap: 100, heatmaps: 0}}
"""


@pytest.mark.integration
def test_finetuning_inside_cross_validation_never_sees_the_test_fold(tmp_path, monkeypatch):
    import histotransfer.finetune.folds as stage
    from histotransfer.core.config import load_config
    from histotransfer.mil.training import build_model
    from histotransfer.stages import run_study

    seen = []
    real_finetune = stage.finetune

    def spy(encoder, head, train_bags, val_bags, **kwargs):
        seen.append(({b.slide_id for b in train_bags}, {b.slide_id for b in val_bags}))
        return real_finetune(encoder, head, train_bags, val_bags, **kwargs)

    monkeypatch.setattr(stage, "finetune", spy)
    (tmp_path / "c.yaml").write_text(STUDY.format(out=tmp_path / "study"))
    config = load_config(tmp_path / "c.yaml")
    outputs = run_study(config)
    assert not outputs.errors
    study = tmp_path / "study"
    ft_id = "efficientnet_lite0@blocks.1+ft"
    assert [r.encoder_id for r in outputs.mil] == ["efficientnet_lite0@blocks.1", ft_id]
    assert len(seen) == 3
    for k, (train, val) in enumerate(seen):
        fold = json.loads(
            (study / "mil" / "efficientnet_lite0@blocks.1" / f"fold{k}" / "history.json").read_text()
        )
        assert train == set(fold["train"])
        assert val == set(fold["val"])
        assert not (train | val) & set(fold["test"])
        ft_fold = study / "finetune" / "efficientnet_lite0@blocks.1" / f"fold{k}"
        # the selection is exactly the top-k attention of this fold's frozen MIL model
        head = build_model(24, 2, config.mil)
        head.load_state_dict(
            torch.load(
                fold_model := study / "mil" / "efficientnet_lite0@blocks.1" / f"fold{k}" / "model.pt",
                weights_only=True,
            )
        )
        assert fold_model.is_file()
        with h5py.File(ft_fold / "selection.h5") as sel:
            assert set(sel) == set(fold["train"]) | set(fold["val"])
            for slide_id in sel:
                with h5py.File(study / "features" / "efficientnet_lite0@blocks.1" / f"{slide_id}.h5") as f:
                    attention = head(torch.from_numpy(f["features"][:])).attention.detach().numpy()
                    top = f["coords"][:][np.argsort(-attention, kind="stable")[:3]]
                np.testing.assert_array_equal(sel[slide_id]["coords"][:], top)
        # fold k's test slides are encoded by fold k's fine-tuned encoder
        tuned = build_encoder(ft_id, weights=ft_fold / "encoder.pt")
        for slide_id in fold["test"]:
            with h5py.File(study / "features" / ft_id / f"fold{k}" / f"{slide_id}.h5") as f:
                assert f.attrs["weights_sha256"] == tuned.weights_sha256
    ft_mil = json.loads((study / "mil" / ft_id / "metrics.json").read_text())
    assert ft_mil["n_slides"] == 6
    report = (study / "report" / "summary.md").read_text()
    assert "## Frozen vs fine-tuned" in report
    assert [p.name for p in outputs.cka] == [f"efficientnet_lite0@blocks.1__{ft_id}-fold1.json"]
    cka = json.loads(outputs.cka[0].read_text())
    assert cka["layers_a"] == ["blocks.0", "blocks.1"]
    assert cka["n_examples"] == 64
    assert "## CKA: frozen vs fine-tuned" in report
    # the per-stage command over the same study reuses every fold's fine-tuning, features and MIL
    from histotransfer.cli import main

    manifest = study / "cohort" / "manifest.csv"
    mtime = (study / "mil" / ft_id / "metrics.json").stat().st_mtime_ns
    args = ["finetune", str(manifest), "--study", str(study), "--encoder", "efficientnet_lite0@blocks.1"]
    assert main([*args, "--config", str(tmp_path / "c.yaml")]) == 0
    assert (study / "mil" / ft_id / "metrics.json").stat().st_mtime_ns == mtime
