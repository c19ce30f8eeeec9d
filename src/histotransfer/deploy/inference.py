"""Classifying new slides with an ONNX bundle and ONNX Runtime alone: no torch is imported here.

Per slide: tile with the bundle's settings, read the tiles on reader threads (each with its own
OpenSlide handle) one batch ahead of the encoder, encode, aggregate, then write under ``out_dir``:
``slides/{slide_id}.h5`` (probabilities, attention aligned with coords), ``heatmaps/{slide_id}.png``,
``tiles/`` (h5 + QC picture) and ``predictions.csv`` (one row per slide, failures with their reason).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from histotransfer.core.config import PredictSettings
from histotransfer.core.cpus import available_cpus
from histotransfer.core.errors import ManifestError
from histotransfer.core.onnx_runtime import ENCODER_INPUT
from histotransfer.deploy.bundle import AGGREGATOR_INPUT, AGGREGATOR_OUTPUTS, Bundle
from histotransfer.io import lineage
from histotransfer.io.atomic import atomic_path
from histotransfer.io.layout import PredictionLayout, slide_file
from histotransfer.io.manifest import SlideRecord, check_slide_id, local_slide_file, read_manifest
from histotransfer.io.provenance import config_hash, provenance_attrs
from histotransfer.io.runner import StageResult, run_per_slide
from histotransfer.io.storage import fetch_gcs, is_gcs_uri
from histotransfer.plots import attention_heatmap
from histotransfer.wsi.batches import tile_batches
from histotransfer.wsi.slides import local_slide_path
from histotransfer.wsi.tiling import TileSet, load_tiles, tile_slide


def slides_to_classify(target: str, *, mpp: float | None = None) -> list[SlideRecord]:
    """Records for a manifest (``.csv``; labels optional) or for one slide file or ``gs://`` URI."""
    if target.lower().endswith(".csv"):
        return read_manifest(fetch_gcs(target) if is_gcs_uri(target) else target, labels=False)
    name = target.rstrip("/").rsplit("/", 1)[-1]
    slide_id = name.rsplit(".", 1)[0] if "." in name else name
    if why := check_slide_id(slide_id):
        raise ManifestError(f"{target}: {why}; list the slide in a manifest CSV with a safe slide_id")
    path = target
    if not is_gcs_uri(target):
        path, _, why = local_slide_file(target, Path.cwd())
        if why:
            raise ManifestError(f"{why} (give a slide, a gs:// URI or a manifest .csv)")
    return [SlideRecord(slide_id, path, label="", patient_id=slide_id, mpp=mpp)]


def classify_tiles(
    bundle: Bundle, slide_path: Path, tiles: TileSet, *, batch_size: int, readers: int
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n_classes,), attention (n_tiles,)) of one tiled slide."""
    n = len(tiles.coords)
    features = np.empty((n, bundle.spec.encoder.dim), dtype=np.float32)
    start = 0
    bar = tqdm(total=n, desc=tiles.slide_id, unit="tile", leave=False, dynamic_ncols=True)
    with bar:
        for batch in tile_batches(slide_path, tiles, batch_size=batch_size, readers=readers):
            features[start : start + len(batch)] = bundle.encoder.run(None, {ENCODER_INPUT: batch})[0]
            start += len(batch)
            bar.update(len(batch))
    if not np.isfinite(features).all():
        raise ValueError(f"{tiles.slide_id}: the encoder gave non-finite features")
    probs, attention = bundle.aggregator.run(list(AGGREGATOR_OUTPUTS), {AGGREGATOR_INPUT: features})
    return probs, attention


def _stats(classes: Sequence[str], probs: np.ndarray, n_tiles: int) -> dict[str, Any]:
    return {
        "prediction": classes[int(np.argmax(probs))],
        **{f"prob_{c}": f"{float(v):.6f}" for c, v in zip(classes, probs, strict=True)},
        "n_tiles": n_tiles,
    }


def read_slide_prediction(path: Path) -> dict[str, Any]:
    """The summary row of a finished ``slides/{slide_id}.h5``."""
    with h5py.File(path, "r") as f:
        classes = json.loads(str(f.attrs["classes"]))
        return _stats(classes, f["probabilities"][:], len(f["attention"]))


BATCH_SIZE = PredictSettings.model_fields["batch_size"].default  # tiles per encoder call


def predict_cohort(
    records: Sequence[SlideRecord],
    bundle: Bundle,
    *,
    out_dir: Path,
    batch_size: int = BATCH_SIZE,
    readers: int | None = None,
    heatmaps: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Classify every slide; failures are recorded in ``predictions.csv``, never raised."""
    out = PredictionLayout(Path(out_dir))
    spec = bundle.spec
    readers = readers or min(8, available_cpus())

    def stage_config(record: SlideRecord, identity: dict | None = None) -> dict[str, Any]:
        slide = lineage.resume_identity(record.path, identity)  # a slide replaced at its path: again
        return {
            "stage": "predict",
            "bundle": spec.integrity,
            "slide": record.path if slide is None else None,  # a moved slide is the same slide
            "identity": slide,
            "mpp": record.mpp,
        }

    def work(record: SlideRecord) -> dict[str, Any]:
        tile_slide(record, out_dir=out.tiles, tiling=spec.tiling)
        tiles = load_tiles(slide_file(out.tiles, record.slide_id))
        local = local_slide_path(record.path)
        probs, attention = classify_tiles(bundle, local, tiles, batch_size=batch_size, readers=readers)
        probs, attention = probs.astype(np.float32), attention.astype(np.float32)
        made_from = {
            "kind": "prediction",
            "slide": tiles.lineage["slide"],
            "tiles": {k: tiles.lineage[k] for k in ("digest", "tiling")},
            "bundle": {"path": str(bundle.path.resolve()), "integrity": spec.integrity, "name": spec.name},
            "digest": lineage.array_digest(probs, attention, tiles.coords),
        }
        with atomic_path(out.slide(record.slide_id)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(provenance_attrs(stage_config(record, tiles.lineage["slide"])))
            f.attrs[lineage.LINEAGE] = lineage.h5_attr(made_from)
            f.attrs.update(slide_id=record.slide_id, bundle=str(bundle.path), encoder_id=spec.encoder.id)
            f.attrs["classes"] = json.dumps(spec.classes)
            f.create_dataset("probabilities", data=probs)  # (n_classes,)
            f.create_dataset("attention", data=attention)  # (n_tiles,)
            f.create_dataset("coords", data=tiles.coords)  # (n_tiles, 2), as in the tiles file
        if heatmaps:
            attention_heatmap(
                record.path,
                tiles.coords,
                attention,
                patch_size_level0=tiles.patch_size_level0,
                out=out.heatmap(record.slide_id),
            )
        return _stats(spec.classes, probs, len(tiles.coords))

    return run_per_slide(
        records,
        stage="predict",
        output_for=lambda r: out.slide(r.slide_id),
        config_hash_for=lambda r: config_hash(stage_config(r)),
        work=work,
        stats_of=read_slide_prediction,
        summary_path=out.table,
        overwrite=overwrite,
    )
