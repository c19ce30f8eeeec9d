"""The extraction stage: one encoder's features of the tiled slides."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotransfer.core.config import StudyConfig
from histotransfer.core.errors import FeaturesError
from histotransfer.io import lineage
from histotransfer.io.layout import StudyLayout, shard_summary
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.io.outputs import claim_output
from histotransfer.io.runner import StageResult
from histotransfer.stages.common import shard, stage_stats, tiled, tiles_folder
from histotransfer.stages.models import build, engine

if TYPE_CHECKING:
    from histotransfer.features.encoders import Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extracted:
    encoder: Encoder
    result: StageResult


def extract(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    weights: str | Path | None = None,
    fold: int | None = None,
    overwrite: bool = False,
    summary: Path | None = None,
) -> Extracted:
    """Features of the tiled slides with one encoder under ``features/{encoder_id}/``; with ``fold``,
    a fine-tuned id's features with that fold's fine-tuned encoder (from the layout's finetune section,
    checked against the fine-tuning that made it) under ``features/{encoder_id}/fold{fold}/``."""
    from histotransfer.features.extraction import extract_cohort

    settings = engine(config)  # devices first, then folders: a bad device leaves nothing behind
    claim_output(
        layout.features, "features", inputs=[tiles_folder(layout)], lock=layout.features_dir(encoder_id)
    )
    usable = tiled(layout, records)
    lineage.check_tiles(layout.tiles, usable)  # the tiles are those of the manifest's slides
    encoder = build(config, encoder_id, weights) if fold is None else _fold_encoder(layout, encoder_id, fold)
    folder = layout.features_dir(str(encoder.id), fold)
    result = extract_cohort(
        usable,
        tiles_dir=layout.tiles,
        out_dir=folder,
        encoder=encoder,
        settings=settings,
        overwrite=overwrite,
        summary_path=summary,
    )
    return Extracted(encoder, result)


def _fold_encoder(layout: StudyLayout, encoder_id: str, fold: int) -> Encoder:
    """Fold ``fold``'s fine-tuned encoder of the fine-tuned id ``encoder_id``, checked against the
    fine-tuning that recorded it."""
    from histotransfer.core.encoder_ids import frozen_id
    from histotransfer.features.encoders import build_encoder

    if (base := frozen_id(encoder_id)) is None:
        raise FeaturesError(
            f"{encoder_id} is not a fine-tuned encoder id: per-fold features are made for ID+ft"
        )
    tuned = layout.finetune_fold(base, fold)
    if not tuned.encoder.is_file():
        raise FeaturesError(f"{tuned.encoder} not found: fine-tune {base} first (its fold {fold} is missing)")
    encoder = build_encoder(encoder_id, weights=tuned.encoder)
    lineage.check_finetuned(tuned.history, encoder)
    return encoder


def for_artifacts(layout: StudyLayout, config: StudyConfig, *, item: dict) -> dict[str, Any]:
    """Orchestrators: one (encoder, shard) ``item`` of the extraction plan, with a summary of its own."""
    records = shard(read_manifest(layout.manifest), item["shard"], item["shards"])
    encoder_id = str(item["encoder"])
    summary = shard_summary(layout.features_dir(encoder_id), item["shard"])
    weights = item.get("weights") or None
    result = extract(layout, config, records, encoder_id, weights=weights, summary=summary).result
    return stage_stats(result) | {"encoder": encoder_id}
