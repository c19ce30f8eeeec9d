"""The cohort stage: the user's manifest, or the sample cohort built from real H&E pixels.

`histotransfer run` reads a user's manifest where it is; orchestrators (KFP, DVC) give the cohort a
folder of its own (``cohort/manifest.csv``, plus slides and masks for the sample cohort) with
``for_artifacts``, the one place both get it from."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from histotransfer.core.config import StudyConfig
from histotransfer.io.layout import StudyLayout
from histotransfer.io.manifest import SlideRecord, read_manifest, write_manifest
from histotransfer.io.outputs import claim_output

log = logging.getLogger(__name__)


def sample_cohort(layout: StudyLayout, config: StudyConfig) -> Path:
    """The sample cohort (slides, masks, manifest) in the layout's cohort folder, reused when current."""
    from histotransfer.wsi.sample_data import build_sample_cohort

    claim_output(layout.cohort, "cohort")
    log.info("building the sample cohort under %s", layout.cohort)
    return build_sample_cohort(layout.cohort, config=config.sample_data)


def cohort(layout: StudyLayout, config: StudyConfig) -> list[SlideRecord]:
    """The cohort's records: the layout's manifest, or the sample cohort, built (or reused) first."""
    if config.manifest is None:
        sample_cohort(layout, config)
    return read_manifest(layout.manifest)


def for_artifacts(layout: StudyLayout, config: StudyConfig, *, manifest: str | None = None) -> dict[str, Any]:
    """``cohort/manifest.csv`` of the layout: a copy of the user's manifest (``manifest``, else the
    config's; a local path or gs:// URI; its slide paths absolute or gs://, since the copy moves), or
    the sample cohort (with its slides and masks) when there is none."""
    manifest = manifest or (str(config.manifest) if config.manifest is not None else None)
    if manifest:
        from histotransfer.io.storage import fetch_gcs, is_gcs_uri

        local = fetch_gcs(manifest) if is_gcs_uri(manifest) else Path(manifest)
        records = read_manifest(local)
        claim_output(layout.cohort, "cohort", inputs=[local])
        write_manifest(layout.manifest, [_row(r) for r in records])
    else:
        sample_cohort(layout, config)
    records = read_manifest(layout.manifest)
    return {"n_slides": len(records), "labels": sorted({r.label for r in records})}


def _row(record: SlideRecord) -> dict[str, str]:
    return {
        "slide_id": record.slide_id,
        "path": record.path,
        "label": record.label,
        "patient_id": record.patient_id,
        "mpp": "" if record.mpp is None else str(record.mpp),
        "split": record.split or "",
        "site": record.site or "",
    }
