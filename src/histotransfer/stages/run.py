"""The whole study in-process (`histotransfer run`): the stages in order, each reusing what is current.

A stage that fails for one encoder (its MIL, its fine-tuning, its CKA, the export) is recorded in
``StudyOutputs.errors`` and the study goes on with the others; failed slides are in the summaries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from histotransfer import stages
from histotransfer.core import errors
from histotransfer.core.config import StudyConfig
from histotransfer.io.layout import StudyLayout
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.outputs import claim_output
from histotransfer.io.runner import StageResult
from histotransfer.stages.fanout import FanOut, T, fan_out

if TYPE_CHECKING:
    from histotransfer.mil.results import MILResult
    from histotransfer.stages.finetune import FinetuneOutputs

log = logging.getLogger(__name__)


@dataclass
class StudyOutputs:
    layout: StudyLayout
    report: Path | None = None
    stages: dict[str, StageResult] = field(default_factory=dict)
    mil: list = field(default_factory=list)  # MILResult of every encoder that finished, in run order
    errors: dict[str, str] = field(default_factory=dict)  # "encoder id (stage)" -> why it failed
    cka: list[Path] = field(default_factory=list)  # cka/{a}__{b}.json files
    bundle: Path | None = None  # onnx/{name}/: the best model, for `histotransfer predict`

    def add(self, done: FanOut[T]) -> FanOut[T]:
        """Record a fan-out's failures beside the others'."""
        self.errors |= done.errors
        return done


def study_layout(config: StudyConfig) -> StudyLayout:
    """The layout of ``config``'s study: everything under ``output_dir``, the user's manifest in place."""
    return StudyLayout.at(config.output_dir, manifest=config.manifest)


def preflight(layout: StudyLayout, config: StudyConfig) -> None:
    """Claim every folder the study will write, and check its device, before the first slide is touched."""
    claims = {"tiles": layout.tiles, "features": layout.features, "mil": layout.mil, "report": layout.report}
    if config.manifest is None:
        claims["cohort"] = layout.cohort
    if config.finetune.encoders:
        claims |= {"finetune": layout.finetune, "cka": layout.cka}
    if config.export.enabled:
        claims["bundle"] = layout.bundle(config.export.name)
    stages.engine(config)  # the extraction device exists (before any folder is made)
    for kind, folder in claims.items():
        claim_output(folder, kind)


def check_encoders(config: StudyConfig) -> None:
    """Every encoder's weights exist and load (each is built once and dropped: about 0.2 s for the demo's,
    a few seconds for a large foundation model): a WeightsError names the file or how to get it, before
    any slide is read."""
    for spec in config.extraction.encoders:
        stages.build(config, spec.id)


def check_cohort(config: StudyConfig, records: Sequence[SlideRecord]) -> None:
    """What can be known about the cohort before the first slide is tiled: it has two classes and
    splits into the configured folds (and site-held-out folds, with ``evaluation.cv: site``), and slides
    on gs:// can be read (credentials). Each is the error
    a stage would raise hours later."""
    from histotransfer.io.storage import gcs_client
    from histotransfer.mil.crossval import study_folds
    from histotransfer.mil.splits import site_folds

    if len(labels := sorted({r.label for r in records})) < 2:
        raise errors.SplitError(f"the cohort has a single label ({labels}); MIL needs at least two classes")
    study_folds(records, config.mil)  # a SplitError naming the fold, the class and the fixes
    if config.evaluation.cv == "site":  # the rows without a site, a patient in two sites, ...
        site_folds(records, val_fraction=config.mil.holdout_fraction, seed=config.mil.seed)
    if any(r.path.startswith("gs://") for r in records):
        gcs_client()  # a StorageError when there are no credentials


def run_study(config: StudyConfig, *, overwrite: bool = False) -> StudyOutputs:
    """Run every configured stage under ``config.output_dir``; failed slides are reported, not raised."""
    layout = study_layout(config)
    preflight(layout, config)
    check_encoders(config)
    outputs = StudyOutputs(layout)
    records = stages.cohort(layout, config)
    check_cohort(config, records)
    outputs.stages["tile"] = stages.tile(layout, config, records, overwrite=overwrite)

    def frozen(encoder_id: str) -> MILResult:
        extracted = stages.extract(layout, config, records, encoder_id, overwrite=overwrite)
        outputs.stages[f"extract {encoder_id}"] = extracted.result
        return stages.train(layout, config, records, encoder_id, overwrite=overwrite)

    mil = outputs.add(fan_out([spec.id for spec in config.extraction.encoders], frozen, what="mil"))
    if mil.first is not None and not mil.results:
        raise mil.first  # no encoder finished: the study stops here (exit 2 naming why), its report kept
    outputs.mil.extend(mil.results.values())
    waiting = [e for e in config.finetune.encoders if e in mil.results]
    for encoder_id in (e for e in config.finetune.encoders if e not in mil.results):
        outputs.errors[f"{encoder_id} (fine-tuning)"] = "its frozen-feature MIL did not finish"

    def finetune(encoder_id: str) -> FinetuneOutputs:
        tuned = stages.finetune(layout, config, records, encoder_id, overwrite=overwrite)
        for fold, stage in tuned.extraction.items():
            outputs.stages[f"extract {tuned.finetuned_id} fold{fold}"] = stage
        outputs.mil.append(tuned.mil)
        return tuned

    tuned = outputs.add(fan_out(waiting, finetune, what="fine-tuning"))
    cka = outputs.add(fan_out(tuned.results, lambda e: stages.cka(layout, config, records, e), what="cka"))
    outputs.cka.extend(cka.results.values())
    if config.export.enabled and outputs.mil:

        def export(name: str) -> Path:
            best = stages.best_mil_result(layout, outputs.mil)
            return stages.export(layout, config, mil_dir=best, overwrite=overwrite).path

        exported = outputs.add(fan_out([config.export.name], export, what="export"))
        outputs.bundle = exported.results.get(config.export.name)
    outputs.report = stages.report(layout, results=outputs.mil, cka=outputs.cka, bundle=outputs.bundle)
    return outputs
