"""The export stage: a MIL result as a deployable ONNX bundle."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotransfer.core.config import StudyConfig
from histotransfer.core.errors import ExportError
from histotransfer.io import lineage
from histotransfer.io.layout import StudyLayout
from histotransfer.io.outputs import claim_output
from histotransfer.stages.models import weights_for

if TYPE_CHECKING:
    from histotransfer.deploy.packaging import ExportResult
    from histotransfer.mil.results import MILResult

log = logging.getLogger(__name__)


def best_mil_result(layout: StudyLayout, results: Sequence[MILResult] | None = None) -> Path:
    """The best of ``results`` (default: every finished MIL result of the study), as the report ranks
    them (its first row)."""
    from histotransfer.deploy.packaging import best_result
    from histotransfer.mil.results import MILResult

    results = MILResult.load_all(layout.mil) if results is None else results
    if not results:
        raise ExportError(
            f"no MIL results under {layout.mil}: run the study (or `histotransfer train`) first"
        )
    return best_result(list(results)).out_dir


def export(
    layout: StudyLayout,
    config: StudyConfig,
    *,
    mil_dir: Path | None = None,
    out: Path | None = None,
    weights: str | Path | None = None,
    expect_encoder: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """A MIL result (default: the study's best) as an ONNX bundle (default: ``onnx/{export.name}/``).

    One fold's head goes in (``export.fold``, else the fold with the lowest loss), with its encoder:
    for a fine-tuned id, that fold's fine-tuned encoder from the layout's finetune section.
    """
    from histotransfer.core.encoder_ids import frozen_id
    from histotransfer.deploy.packaging import choose_fold, export_study_model, finished_result

    mil_dir = Path(mil_dir) if mil_dir is not None else best_mil_result(layout)
    out = Path(out) if out is not None else layout.bundle(config.export.name)
    claim_output(out, "bundle", inputs=[mil_dir, layout.tiles])
    encoder_id = finished_result(mil_dir).encoder_id
    fold = config.export.fold
    if fold is None:
        fold = choose_fold(mil_dir)[0]
    if weights is None and (base := frozen_id(encoder_id)) is not None:
        tuned = layout.finetune_fold(base, fold)
        weights = tuned.encoder
        if not weights.is_file():
            raise ExportError(f"{weights} not found: the fine-tuned encoder of fold {fold} is missing")
        lineage.check_finetuned_file(tuned.history, weights)  # the study's encoder.pt is that fold's
    return export_study_model(
        mil_dir,
        out=out,
        weights=weights_for(config, encoder_id, weights),
        fold=fold,
        tiles_dir=layout.tiles,
        fp16=config.export.fp16,
        overwrite=overwrite,
        expect_encoder=expect_encoder,
    )


def for_artifacts(layout: StudyLayout, config: StudyConfig) -> dict[str, Any]:
    """Orchestrators: the study's best model as an ONNX bundle under ``onnx/{export.name}/``."""
    spec = export(layout, config).spec
    return {"encoder": spec.encoder.id, "fold": spec.aggregator.fold, "parity": spec.parity}
