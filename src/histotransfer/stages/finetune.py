"""The fine-tuning stage: attention top-k fine-tuning of an encoder in every fold of its frozen MIL
result, then the extraction stage (each fold's slides with that fold's encoder) and the MIL stage again,
on the same folds: ``finetune/{id}/fold{k}/``, ``features/{id}+ft/fold{k}/``, ``mil/{id}+ft/``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from histotransfer.core.config import StudyConfig
from histotransfer.core.errors import FeaturesError
from histotransfer.io import lineage
from histotransfer.io.layout import StudyLayout
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.io.outputs import claim_output
from histotransfer.io.runner import StageResult
from histotransfer.stages.common import featured, tiles_folder
from histotransfer.stages.extract import extract
from histotransfer.stages.fanout import fan_out
from histotransfer.stages.models import build, engine
from histotransfer.stages.train import train

if TYPE_CHECKING:
    from histotransfer.mil.results import MILResult

log = logging.getLogger(__name__)


@dataclass
class FinetuneOutputs:
    encoder_id: str
    finetuned_id: str
    fold_encoders: dict[int, Path]  # fold -> its fine-tuned encoder.pt
    extraction: dict[int, StageResult]  # fold -> the extraction of the cohort with that fold's encoder
    mil: MILResult


def finetune(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    weights: str | Path | None = None,
    overwrite: bool = False,
) -> FinetuneOutputs:
    """Attention top-k fine-tuning of ``encoder_id`` in every fold of its frozen MIL result, then
    features (``features/{id}+ft/fold{k}/``) and MIL (``mil/{id}+ft/``) again."""
    from histotransfer.core.encoder_ids import finetuned_id
    from histotransfer.features.bags import BagStore
    from histotransfer.finetune.folds import frozen_folds, tune_fold
    from histotransfer.mil.results import MILResult
    from histotransfer.wsi.tiling import load_tiles

    if not (frozen := layout.mil_result(encoder_id)).metrics.is_file():
        raise FeaturesError(
            f"{frozen.dir} has no finished MIL result: fine-tuning starts from the "
            f"frozen features' MIL (run extraction and `histotransfer train` for {encoder_id} first)"
        )
    settings = engine(config)
    tuned = finetuned_id(encoder_id)
    locks = {
        "finetune": layout.finetune_dir(encoder_id),
        "features": layout.features_dir(tuned),
        "mil": layout.mil_result(tuned).dir,
    }
    for section, lock in locks.items():  # it reads these sections too: no input check
        claim_output(getattr(layout, section), section, lock=lock)
    usable = featured(layout, records, encoder_id)
    tiles = lineage.check_tiles(tiles_folder(layout), usable)
    lineage.check_slides(usable, tiles)  # fine-tuning reads its tiles from the slides
    features = lineage.check_features(layout.features_dir(encoder_id), usable, tiles=tiles)
    encoder = build(config, encoder_id, weights)
    lineage.check_mil(
        frozen.dir,
        MILResult.load(frozen.dir).metrics.get("lineage"),
        folds=frozen.folds(),
        weights=(encoder.weights_sha256, encoder.weights_source),
        features=features,
        records=usable,
        weights_fix="give --weights the checkpoint given to extract, or leave it out to use the config's",
    )
    classes = sorted({r.label for r in usable})
    store = BagStore(usable, features.folder, classes=classes)
    folds = frozen_folds(frozen, usable, config.mil)
    tile_sets = {r.slide_id: load_tiles(layout.tiles_file(r.slide_id)) for r in usable}
    paths = {r.slide_id: r.path for r in usable}
    fold_encoders, extraction = {}, {}
    for fold in tqdm(folds, desc=f"finetune {encoder_id}", unit="fold", dynamic_ncols=True):
        fold_encoders[fold.index] = tune_fold(
            fold,
            encoder=encoder,
            store=store,
            tiles=tile_sets,
            paths=paths,
            features=features,
            layout=layout,
            mil=config.mil,
            cfg=config.finetune,
            device=settings.device,
            overwrite=overwrite,
        )
        extracted = extract(layout, config, usable, tuned, fold=fold.index, overwrite=overwrite)
        extraction[fold.index] = extracted.result
    mil = train(layout, config, usable, tuned, folds=folds, overwrite=overwrite)
    return FinetuneOutputs(encoder_id, tuned, fold_encoders, extraction, mil)


def for_artifacts(layout: StudyLayout, config: StudyConfig) -> dict[str, Any]:
    """Orchestrators: every ``finetune.encoders`` id, as `histotransfer run` does after the frozen study
    (one failure rule: stages.fanout); each fine-tuned encoder's MIL metrics and the failures."""
    from histotransfer.mil.results import classification_summary

    records = read_manifest(layout.manifest)
    done = fan_out(
        config.finetune.encoders, lambda e: finetune(layout, config, records, e), what="fine-tuning"
    ).check()
    metrics = {
        t.finetuned_id: classification_summary(t.mil.out_dir)["metrics"] for t in done.results.values()
    }
    return {"metrics": metrics, "errors": done.errors}
