"""Fine-tuning as a study stage: per fold select, fine-tune, re-extract with the fold's fine-tuned
encoder (``{encoder_id}+ft``), and cross-validate MIL again on those features with the same folds."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from histotransfer.bags import BagStore, FeaturesError
from histotransfer.config import EvaluationConfig, FinetuneConfig, MILConfig
from histotransfer.encoders import Encoder, EncoderId, build_encoder, parse_encoder_id
from histotransfer.extraction import EngineSettings, extract_cohort
from histotransfer.finetune import finetune, make_bags, save_finetuned, save_selection
from histotransfer.manifest import SlideRecord
from histotransfer.mil_stage import LesionMasks, MILResult, study_folds, train_mil
from histotransfer.provenance import config_hash, is_current, sha256_file
from histotransfer.runner import StageResult
from histotransfer.splits import Fold
from histotransfer.tiling import load_tiles
from histotransfer.training import build_model

log = logging.getLogger(__name__)
FT_TAG = "ft"


@dataclass
class FinetuneOutputs:
    encoder_id: str
    finetuned_id: str
    fold_encoders: dict[int, Path]
    extraction: dict[int, StageResult]
    mil: MILResult


def finetuned_id(encoder_id: str) -> str:
    """``resnet18@layer3`` -> ``resnet18@layer3+ft``; ``densenet121+kimianet`` -> ``...+kimianet-ft``."""
    enc = parse_encoder_id(encoder_id)
    return str(EncoderId(enc.arch, enc.cut, f"{enc.tag}-{FT_TAG}" if enc.tag else FT_TAG))


def frozen_id(encoder_id: str) -> str | None:
    """The inverse of finetuned_id: ``X+ft`` -> ``X``, ``X+tag-ft`` -> ``X+tag``; None for other ids."""
    enc = parse_encoder_id(encoder_id)
    if enc.tag is None or not (enc.tag == FT_TAG or enc.tag.endswith(f"-{FT_TAG}")):
        return None
    return str(EncoderId(enc.arch, enc.cut, enc.tag.removesuffix(FT_TAG).removesuffix("-") or None))


def fold_encoder_file(finetune_dir: Path, encoder_id: str, fold: int) -> Path:
    """Where fold ``fold``'s fine-tuned copy of the frozen ``encoder_id`` is saved."""
    return Path(finetune_dir) / encoder_id / f"fold{fold}" / "encoder.pt"


def _frozen_folds(mil_dir: Path, records: Sequence[SlideRecord], mil: MILConfig) -> list[Fold]:
    """The folds of the frozen-feature MIL run, checked against the folds these records make now."""
    folds = study_folds(records, mil)
    for fold in folds:
        saved = json.loads((mil_dir / f"fold{fold.index}" / "history.json").read_text())
        if (tuple(saved["train"]), tuple(saved["val"]), tuple(saved["test"])) != (
            fold.train,
            fold.val,
            fold.test,
        ):
            raise FeaturesError(
                f"{mil_dir}: its folds are not this cohort's; re-run MIL for the frozen features first"
            )
    return folds


def finetune_study(
    records: Sequence[SlideRecord],
    *,
    encoder: Encoder,
    features_dir: Path,
    tiles_dir: Path,
    mil_dir: Path,
    finetune_dir: Path,
    mil: MILConfig,
    cfg: FinetuneConfig,
    evaluation: EvaluationConfig,
    settings: EngineSettings,
    lesion_masks: LesionMasks | None,
    overwrite: bool = False,
) -> FinetuneOutputs:
    """Fine-tune ``encoder`` in every fold of its frozen MIL run, re-extract, re-run MIL."""
    encoder_id = str(encoder.id)
    ft_id = finetuned_id(encoder_id)
    classes = sorted({r.label for r in records})
    store = BagStore(records, features_dir / encoder_id, classes=classes, tiles_dir=tiles_dir)
    folds = _frozen_folds(mil_dir / encoder_id, records, mil)
    tiles = {r.slide_id: load_tiles(tiles_dir / f"{r.slide_id}.h5") for r in records}
    paths = {r.slide_id: r.path for r in records}
    fold_encoders, extraction = {}, {}
    for fold in tqdm(folds, desc=f"finetune {encoder_id}", unit="fold", dynamic_ncols=True):
        out = fold_encoder_file(finetune_dir, encoder_id, fold.index).parent
        head_file = mil_dir / encoder_id / f"fold{fold.index}" / "model.pt"
        expected = config_hash(
            {
                "stage": "finetune",
                "finetune": cfg.model_dump(mode="json", exclude={"encoders"}),
                "encoder": encoder.weights_sha256,
                "head": sha256_file(head_file),
                "fold": [fold.train, fold.val],
            }
        )
        if overwrite or not is_current(out / "history.json", expected):
            head = build_model(store.dim, len(classes), mil)
            head.load_state_dict(torch.load(head_file, weights_only=True))
            kwargs = dict(store=store, head=head, tiles=tiles, paths=paths, k=cfg.k, mode=cfg.selection)
            train_bags = make_bags(fold.train, seed=cfg.seed, **kwargs)
            val_bags = make_bags(fold.val, seed=cfg.seed + 1, **kwargs)
            save_selection(out / "selection.h5", [*train_bags, *val_bags], mode=cfg.selection)
            result = finetune(
                encoder,
                head,
                train_bags,
                val_bags,
                n_classes=len(classes),
                cfg=cfg,
                device=settings.device,
                num_workers=min(settings.num_workers, 4),
            )
            parts = {"train": list(fold.train), "val": list(fold.val), "test": list(fold.test)}
            save_finetuned(out, result, parts, cfg, expected)
        fold_encoders[fold.index] = out / "encoder.pt"
        fold_encoder = build_encoder(ft_id, weights=out / "encoder.pt")
        extraction[fold.index] = extract_cohort(
            records,
            tiles_dir=tiles_dir,
            out_dir=features_dir,
            encoder=fold_encoder,
            settings=settings,
            overwrite=overwrite,
            dest=features_dir / ft_id / f"fold{fold.index}",
        )
    failed = {o.slide_id for stage in extraction.values() for o in stage.failed}
    result = train_mil(
        [r for r in records if r.slide_id not in failed],
        features_dir={k: features_dir / ft_id / f"fold{k}" for k in fold_encoders},
        out_dir=mil_dir,
        mil=mil,
        evaluation=evaluation,
        tiles_dir=tiles_dir,
        lesion_masks=lesion_masks,
        overwrite=overwrite,
    )
    return FinetuneOutputs(encoder_id, ft_id, fold_encoders, extraction, result)
