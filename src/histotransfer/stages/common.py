"""What every stage shares: which slides go on (those an earlier stage did not record as failed), the
folders a stage reads, an encoder's weights and the extraction engine."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotransfer.core.errors import FeaturesError
from histotransfer.io.layout import SUMMARY, StudyLayout
from histotransfer.io.manifest import SlideRecord

if TYPE_CHECKING:
    from histotransfer.io.runner import StageResult

log = logging.getLogger(__name__)


def failed_in(summary: Path) -> set[str]:
    """The slides a stage's ``summary.csv`` records as failed (none when it has no summary)."""
    if not summary.is_file():
        return set()
    try:
        with summary.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"slide_id", "status"} <= set(reader.fieldnames or ()):
                raise KeyError("no slide_id and status columns")
            return {row["slide_id"] for row in reader if row.get("status") == "failed"}
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError) as exc:
        raise FeaturesError(
            f"{summary} is not a summary histotransfer wrote ({type(exc).__name__}: {exc}): run the stage "
            "that writes it again (its outputs are resumed), or remove the file"
        ) from exc


def going_on(records: Sequence[SlideRecord], summary: Path, what: str) -> list[SlideRecord]:
    """``records`` without the slides that ``summary`` records as failed (they are reported there)."""
    failed = failed_in(summary)
    if dropped := [r.slide_id for r in records if r.slide_id in failed]:
        log.warning("%d slide(s) left out: %s failed on them (see %s)", len(dropped), what, summary)
    return [r for r in records if r.slide_id not in failed]


def tiled(layout: StudyLayout, records: Sequence[SlideRecord]) -> list[SlideRecord]:
    """The slides whose tiling did not fail (all of them when the layout has no tiles folder)."""
    if not layout.has("tiles"):
        return list(records)
    return going_on(records, layout.tiles / SUMMARY, "tiling")


def tiles_folder(layout: StudyLayout) -> Path:
    """The layout's tiles folder, which a stage reading tiles needs to exist."""
    if layout.tiles.is_file():
        raise FeaturesError(
            f"--tiles {layout.tiles} is a file, not a tiles folder: give the folder that `histotransfer "
            "tile` wrote"
        )
    if not layout.tiles.is_dir():
        raise FeaturesError(
            f"tiles folder {layout.tiles} not found: tile the cohort first "
            f"(`histotransfer tile MANIFEST --out {layout.tiles}`), or give --tiles the folder it wrote"
        )
    return layout.tiles


def featured(layout: StudyLayout, records: Sequence[SlideRecord], encoder_id: str) -> list[SlideRecord]:
    """The tiled slides whose feature extraction with ``encoder_id`` did not fail."""
    folder = layout.features_dir(encoder_id)
    return going_on(tiled(layout, records), folder / SUMMARY, f"extraction with {encoder_id}")


def shard(records: Sequence[SlideRecord], index: int, count: int) -> list[SlideRecord]:
    """Slides of shard ``index`` of ``count`` (round robin in manifest order: shards stay balanced)."""
    index, count = int(index), int(count)  # values collected by KFP arrive as floats
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    return list(records[index::count])


def stage_stats(result: StageResult) -> dict[str, Any]:
    """An orchestrator's view of a slide-parallel stage: counts; a failure when every slide failed."""
    failed = result.failed
    if failed and len(failed) == len(result.outcomes):
        raise RuntimeError(result.failure_report())
    if failed:
        log.warning(result.failure_report())
    return {"slides": len(result.outcomes), "failed": len(failed)}
