"""The report stage: the study's HTML report, its summary and DVC's tracking files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from histotransfer.core.errors import BundleError, FeaturesError
from histotransfer.io.layout import BUNDLE_SPEC, StudyLayout
from histotransfer.io.outputs import claim_output

if TYPE_CHECKING:
    from histotransfer.mil.results import MILResult

log = logging.getLogger(__name__)


def report(
    layout: StudyLayout,
    *,
    results: Sequence[MILResult] | None = None,
    cka: Sequence[Path] | None = None,
    bundle: Path | None = None,
    tracking: bool = False,
) -> Path:
    """``report/index.html`` and ``summary.md``: of ``results``, ``cka`` and ``bundle`` (defaults: every
    finished MIL result and CKA comparison of the study, its one bundle if it has one); ``tracking``:
    also DVC's ``metrics.json`` and ``plots/``."""
    from histotransfer.mil.results import MILResult
    from histotransfer.report.html import comparisons, write_report, write_tracking
    from histotransfer.report.verify import check

    if results is None:
        results = MILResult.load_all(layout.mil)
        if not results:
            raise FeaturesError(
                f"no MIL results under {layout.mil}: run `histotransfer run` or `train` first"
            )
        if bundle is None and len(bundles := layout.bundles()) == 1:
            bundle = bundles[0]
        elif bundle is None and bundles:
            names = ", ".join(str(b) for b in bundles)
            log.warning("the study has %d bundles (%s): give --bundle to describe one", len(bundles), names)
    if bundle is not None and not (bundle / BUNDLE_SPEC).is_file():
        raise BundleError(f"--bundle {bundle} is not a bundle (no {BUNDLE_SPEC}): give STUDY/onnx/NAME")
    fixed = "move them out: a study's report is always written there"
    claim_output(layout.report, "report", inputs=[layout.mil], fix=fixed)
    if tracking:
        claim_output(layout.tracking_plots, "plots", fix=fixed)
    compared = comparisons(sorted(results, key=MILResult.rank_key))  # bootstraps: computed once
    path = write_report(
        results,
        report_dir=layout.report,
        tiles_dir=layout.tiles,
        cka=layout.cka_results() if cka is None else cka,
        bundle=bundle,
        verification=check(layout.report.parent),
        compared=compared,
    )
    if tracking:
        write_tracking(
            results, metrics=layout.tracking_metrics, plots=layout.tracking_plots, compared=compared
        )
    return path
