"""Fine-tuning in one fold of a study: the fold's attention top-k tiles, its frozen MIL head, the
encoder fine-tuned and saved (``finetune/{id}/fold{k}/``), reused when current. The stage
(histotransfer.stages.finetune) runs it per fold and then re-extracts and re-trains MIL."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from histotransfer.core.config import FinetuneConfig, MILConfig, results_of
from histotransfer.core.encoder_ids import finetuned_id
from histotransfer.features.bags import BagStore, FeaturesError
from histotransfer.features.encoders import Encoder
from histotransfer.finetune.tuning import finetune, make_bags, save_finetuned
from histotransfer.io import lineage
from histotransfer.io.layout import MILLayout, StudyLayout
from histotransfer.io.lineage import FeatureSet
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.provenance import config_hash, is_current, read_json, sha256_file
from histotransfer.mil.crossval import study_folds
from histotransfer.mil.splits import Fold
from histotransfer.mil.training import build_model
from histotransfer.wsi.tiling import TileSet

log = logging.getLogger(__name__)


def frozen_folds(frozen: MILLayout, records: Sequence[SlideRecord], mil: MILConfig) -> list[Fold]:
    """The folds of the frozen-feature MIL run, checked against the folds these records make now."""
    folds = study_folds(records, mil)
    for fold in folds:
        redo = "train the frozen features' MIL again (histotransfer train ... --overwrite)"
        saved = read_json(frozen.fold_history(fold.index), redo=redo, keys=("train", "val", "test"))
        if (tuple(saved["train"]), tuple(saved["val"]), tuple(saved["test"])) != (
            fold.train,
            fold.val,
            fold.test,
        ):
            raise FeaturesError(
                f"{frozen.dir}: its folds are not this cohort's; re-run MIL for the frozen features first"
            )
    return folds


def tune_fold(
    fold: Fold,
    *,
    encoder: Encoder,
    store: BagStore,
    tiles: Mapping[str, TileSet],
    paths: Mapping[str, str],
    features: FeatureSet,
    layout: StudyLayout,
    mil: MILConfig,
    cfg: FinetuneConfig,
    device: str,
    overwrite: bool = False,
) -> Path:
    """Fine-tune ``encoder`` on fold ``fold``'s attention top-k tiles, starting from that fold's frozen
    MIL head; returns the fold's ``encoder.pt``, reused when current (same settings, weights, head,
    features and fold). ``features``: the frozen features as the stage checked them."""
    encoder_id = str(encoder.id)
    ft_id = finetuned_id(encoder_id)
    classes = store.classes
    frozen = layout.mil_result(encoder_id)
    out = layout.finetune_fold(encoder_id, fold.index)
    head_file = frozen.fold_model(fold.index)
    head_sha = sha256_file(head_file)
    expected = config_hash(
        {
            "stage": "finetune",
            "finetune": {k: v for k, v in results_of("finetune", cfg).items() if k != "encoders"},
            "encoder": encoder.weights_sha256,
            "head": head_sha,
            "features": features.digest,
            "fold": [fold.train, fold.val],
        }
    )
    if not overwrite and is_current(out.history, expected):
        return out.encoder
    head = build_model(store.dim, len(classes), mil)
    head.load_state_dict(torch.load(head_file, weights_only=True))
    kwargs = dict(store=store, head=head, tiles=tiles, paths=paths, k=cfg.k, mode=cfg.selection)
    train_bags = make_bags(fold.train, seed=cfg.seed, **kwargs)
    val_bags = make_bags(fold.val, seed=cfg.seed + 1, **kwargs)
    result = finetune(encoder, head, train_bags, val_bags, n_classes=len(classes), cfg=cfg, device=device)
    parts = {"train": list(fold.train), "val": list(fold.val), "test": list(fold.test)}

    def made_from(weights_sha256: str) -> dict:
        tuned = {"id": ft_id, "weights_sha256": weights_sha256, "weights_source": "file:encoder.pt"}
        return lineage.finetune_record(frozen.dir, fold.index, head_sha, features, tuned)

    save_finetuned(out, result, [*train_bags, *val_bags], parts, cfg, expected, made_from)
    return out.encoder
