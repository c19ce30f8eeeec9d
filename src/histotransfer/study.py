"""The whole study in-process (`histotransfer run`): each stage reuses what is already current."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from histotransfer.config import StudyConfig
from histotransfer.manifest import read_manifest
from histotransfer.runner import StageResult
from histotransfer.sample_data import build_sample_cohort
from histotransfer.tiling import tile_cohort

log = logging.getLogger(__name__)


@dataclass
class StudyOutputs:
    manifest: Path
    tiles_dir: Path
    stages: dict[str, StageResult] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, StageResult]:
        return {name: result for name, result in self.stages.items() if result.failed}


def run_study(config: StudyConfig, *, overwrite: bool = False) -> StudyOutputs:
    """Run every configured stage under ``config.output_dir``; failed slides are reported, not raised."""
    out = config.output_dir
    if config.manifest is not None:
        manifest = config.manifest
    else:
        log.info("building the sample cohort under %s", out / "cohort")
        manifest = build_sample_cohort(out / "cohort", config=config.sample_data)
    records = read_manifest(manifest)
    outputs = StudyOutputs(manifest=manifest, tiles_dir=out / "tiles")
    outputs.stages["tile"] = tile_cohort(
        records, out_dir=outputs.tiles_dir, tiling=config.tiling, overwrite=overwrite
    )
    return outputs
