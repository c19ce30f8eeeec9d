"""Fine-tuning as a study stage: per fold select, fine-tune, re-extract with the fold's fine-tuned
encoder (``{encoder_id}+ft``), and cross-validate MIL again on those features with the same folds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from histotransfer import lineage
from histotransfer.config import EvaluationConfig, FinetuneConfig, MILConfig
from histotransfer.encoder_ids import finetuned_id
from histotransfer.features.bags import BagStore, FeaturesError
from histotransfer.features.encoders import Encoder, build_encoder
from histotransfer.features.extraction import EngineSettings, extract_cohort
from histotransfer.finetune.training import finetune, make_bags, save_finetuned
from histotransfer.layout import SUMMARY, MILLayout, StudyLayout
from histotransfer.lineage import FeatureSet
from histotransfer.manifest import SlideRecord
from histotransfer.mil.splits import Fold
from histotransfer.mil.study import LesionMasks, MILResult, study_folds, train_mil
from histotransfer.mil.training import build_model
from histotransfer.provenance import config_hash, is_current, read_json, sha256_file
from histotransfer.runner import StageResult
from histotransfer.wsi.tiling import load_tiles

log = logging.getLogger(__name__)


@dataclass
class FinetuneOutputs:
    encoder_id: str
    finetuned_id: str
    fold_encoders: dict[int, Path]
    extraction: dict[int, StageResult]
    mil: MILResult


def _frozen_folds(frozen: MILLayout, records: Sequence[SlideRecord], mil: MILConfig) -> list[Fold]:
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


def finetune_study(
    records: Sequence[SlideRecord],
    *,
    encoder: Encoder,
    features: FeatureSet,
    layout: StudyLayout,
    mil: MILConfig,
    cfg: FinetuneConfig,
    evaluation: EvaluationConfig,
    settings: EngineSettings,
    lesion_masks: LesionMasks | None,
    overwrite: bool = False,
) -> FinetuneOutputs:
    """Fine-tune ``encoder`` in every fold of its frozen MIL run, re-extract, re-run MIL.
    ``features``: the frozen features as the stage checked them against the MIL result."""
    encoder_id = str(encoder.id)
    ft_id = finetuned_id(encoder_id)
    classes = sorted({r.label for r in records})
    store = BagStore(records, features.folder, classes=classes)
    frozen = layout.mil_result(encoder_id)
    folds = _frozen_folds(frozen, records, mil)
    tiles = {r.slide_id: load_tiles(layout.tiles_file(r.slide_id)) for r in records}
    paths = {r.slide_id: r.path for r in records}
    fold_encoders, extraction = {}, {}
    for fold in tqdm(folds, desc=f"finetune {encoder_id}", unit="fold", dynamic_ncols=True):
        out = layout.finetune_fold(encoder_id, fold.index)
        head_file = frozen.fold_model(fold.index)
        head_sha = sha256_file(head_file)
        expected = config_hash(
            {
                "stage": "finetune",
                # recomputing activations changes memory, not the result: not part of the hash
                "finetune": cfg.model_dump(mode="json", exclude={"encoders", "grad_checkpointing"}),
                "encoder": encoder.weights_sha256,
                "head": head_sha,
                "features": features.digest,
                "fold": [fold.train, fold.val],
            }
        )
        if overwrite or not is_current(out.history, expected):
            head = build_model(store.dim, len(classes), mil)
            head.load_state_dict(torch.load(head_file, weights_only=True))
            kwargs = dict(store=store, head=head, tiles=tiles, paths=paths, k=cfg.k, mode=cfg.selection)
            train_bags = make_bags(fold.train, seed=cfg.seed, **kwargs)
            val_bags = make_bags(fold.val, seed=cfg.seed + 1, **kwargs)
            result = finetune(
                encoder,
                head,
                train_bags,
                val_bags,
                n_classes=len(classes),
                cfg=cfg,
                device=settings.device,
            )
            parts = {"train": list(fold.train), "val": list(fold.val), "test": list(fold.test)}

            def made_from(weights_sha256: str, fold=fold, head_sha=head_sha) -> dict:
                tuned = {"id": ft_id, "weights_sha256": weights_sha256, "weights_source": "file:encoder.pt"}
                return lineage.finetune_record(frozen.dir, fold.index, head_sha, features, tuned)

            save_finetuned(out, result, [*train_bags, *val_bags], parts, cfg, expected, made_from)
        fold_encoders[fold.index] = out.encoder
        fold_encoder = build_encoder(ft_id, weights=out.encoder)
        lineage.check_finetuned(out.history, fold_encoder)
        fold_features = layout.features_dir(ft_id, fold.index)
        extraction[fold.index] = extract_cohort(
            records,
            tiles_dir=layout.tiles,
            out_dir=fold_features,
            encoder=fold_encoder,
            settings=settings,
            overwrite=overwrite,
            summary_path=fold_features / SUMMARY,
        )
    failed = {o.slide_id for stage in extraction.values() for o in stage.failed}
    result = train_mil(
        [r for r in records if r.slide_id not in failed],
        features_dir={k: layout.features_dir(ft_id, k) for k in fold_encoders},
        out_dir=layout.mil,
        mil=mil,
        evaluation=evaluation,
        tiles_dir=layout.tiles,
        lesion_masks=lesion_masks,
        overwrite=overwrite,
    )
    return FinetuneOutputs(encoder_id, ft_id, fold_encoders, extraction, result)
