"""The prediction stage: new slides classified with an ONNX bundle (torch-free)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from histotransfer.io.outputs import claim_output
from histotransfer.io.runner import StageResult

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def predict(
    bundle_dir: Path,
    slides: str,
    out: Path,
    *,
    mpp: float | None = None,
    batch_size: int | None = None,
    readers: int | None = None,
    threads: int | None = None,
    heatmaps: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Classify ``slides`` (a slide, a gs:// URI or a manifest) with the ONNX bundle in ``bundle_dir``
    into ``out`` (see PredictionLayout). Torch-free: ONNX Runtime, OpenSlide and numpy only."""
    from histotransfer.deploy.bundle import load_bundle
    from histotransfer.deploy.inference import BATCH_SIZE, predict_cohort, slides_to_classify
    from histotransfer.io.storage import is_gcs_uri

    local_input = None if is_gcs_uri(slides) else Path(slides)
    claim_output(out, "predictions", inputs=[bundle_dir, local_input])
    bundle = load_bundle(bundle_dir, threads=threads)
    spec = bundle.spec
    log.info(
        "bundle %s: %s, classes %s, on %s", bundle.path, spec.encoder.id, spec.classes, bundle.providers[0]
    )
    return predict_cohort(
        slides_to_classify(slides, mpp=mpp),
        bundle,
        out_dir=out,
        batch_size=batch_size or BATCH_SIZE,
        readers=readers,
        heatmaps=heatmaps,
        overwrite=overwrite,
    )
