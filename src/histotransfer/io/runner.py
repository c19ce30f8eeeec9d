"""The per-slide loop every stage uses: skip what is current, run the rest, isolate failures.

One slide's failure is recorded with its reason and never stops the others; the summary CSV is
written atomically at the end, listing every slide's status.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from histotransfer.core.errors import Interrupted
from histotransfer.io.atomic import atomic_path
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.provenance import is_current

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOutcome:
    slide_id: str
    status: str  # "done", "skipped" (output current) or "failed"
    reason: str = ""
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    outcomes: list[SlideOutcome]
    summary_path: Path

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def failure_report(self) -> str:
        lines = [f"  {o.slide_id}: {o.reason}" for o in self.failed]
        return f"{len(self.failed)} of {len(self.outcomes)} slide(s) failed:\n" + "\n".join(lines)


def run_per_slide(
    records: Sequence[SlideRecord],
    *,
    stage: str,
    output_for: Callable[[SlideRecord], Path],
    config_hash_for: Callable[[SlideRecord], str],
    work: Callable[[SlideRecord], dict[str, Any]],
    stats_of: Callable[[Path], dict[str, Any]],
    summary_path: Path,
    overwrite: bool = False,
) -> StageResult:
    """Run ``work(record)`` for every slide whose output is not current.

    ``work`` writes the output (atomically, recording the config whose hash ``config_hash_for``
    gives) and returns stats for the summary;
    ``stats_of`` reads the same stats back from an output that is skipped.
    """
    outcomes: list[SlideOutcome] = []
    try:
        with logging_redirect_tqdm():  # warnings print above the bar, not through it
            bar = tqdm(records, desc=stage, unit="slide", dynamic_ncols=True)
            for record in bar:
                bar.set_postfix_str(record.slide_id)
                output = output_for(record)
                if not overwrite and is_current(output, config_hash_for(record)):
                    outcomes.append(SlideOutcome(record.slide_id, "skipped", stats=stats_of(output)))
                    continue
                outcomes.append(_run_one(record, stage, work))
    except KeyboardInterrupt as exc:  # the slide being worked on leaves nothing (atomic writes): say what did
        write_summary(summary_path, outcomes)
        remaining = len(records) - len(outcomes)
        signal = getattr(exc, "signal", "SIGINT")
        raise Interrupted(stage, StageResult(outcomes, summary_path), remaining, signal) from None
    write_summary(summary_path, outcomes)
    return StageResult(outcomes, summary_path)


def _run_one(record: SlideRecord, stage: str, work: Callable[[SlideRecord], dict[str, Any]]) -> SlideOutcome:
    start = time.perf_counter()
    try:
        stats = work(record)
    except Exception as exc:  # one bad slide must not sink the cohort
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        log.warning("%s failed on %s: %s", stage, record.slide_id, reason)
        log.debug("traceback of the failure", exc_info=True)
        return SlideOutcome(record.slide_id, "failed", reason, time.perf_counter() - start)
    return SlideOutcome(record.slide_id, "done", "", time.perf_counter() - start, stats)


def write_summary(path: Path, outcomes: Sequence[SlideOutcome]) -> None:
    stat_keys = sorted({k for o in outcomes for k in o.stats})
    columns = ["slide_id", "status", "reason", "seconds", *stat_keys]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for o in outcomes:
            row = {"slide_id": o.slide_id, "status": o.status, "reason": o.reason}
            writer.writerow(row | {"seconds": f"{o.seconds:.3f}"} | o.stats)
