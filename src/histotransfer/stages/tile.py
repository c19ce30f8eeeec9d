"""The tiling stage: tiles and QC pictures of every slide."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotransfer.core.config import StudyConfig
from histotransfer.io.layout import StudyLayout, shard_summary
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.io.outputs import claim_output
from histotransfer.io.runner import StageResult
from histotransfer.stages.common import shard, stage_stats

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def tile(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    *,
    overwrite: bool = False,
    summary: Path | None = None,
) -> StageResult:
    """Tiles and QC pictures of every slide under ``layout.tiles``."""
    from histotransfer.wsi.tiling import tile_cohort

    claim_output(layout.tiles, "tiles", inputs=[layout.manifest])
    return tile_cohort(
        records,
        out_dir=layout.tiles,
        tiling=config.tiling,
        overwrite=overwrite,
        summary_path=summary,
    )


def for_artifacts(layout: StudyLayout, config: StudyConfig, *, item: dict) -> dict[str, Any]:
    """Orchestrators: tile shard ``item["shard"]`` of ``item["shards"]``, with a summary of its own."""
    records = shard(read_manifest(layout.manifest), item["shard"], item["shards"])
    summary = shard_summary(layout.tiles, item["shard"])
    return stage_stats(tile(layout, config, records, summary=summary))
