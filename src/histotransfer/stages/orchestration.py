"""Stage entry points for orchestrators (the KFP components, DVC stages): folders in, a folder out.

Every artifact folder holds part of a study in the study layout (``cohort/``, ``tiles/``,
``features/{encoder}/``, ``mil/{encoder}/``, ``finetune/...``, ``cka/``, ``onnx/{name}/``, ``report/``).
A stage assembles a *study view* (a temporary folder of symlinks to the entries of its input folders),
runs the library on it exactly as `histotransfer run` would, and moves what the stage created into its
output folder. Inputs are never written to. Config sections arrive as plain dicts and are validated by
the same schema as ``params.yaml``. No kfp import here: components only call these functions.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from histotransfer import stages
from histotransfer.atomic import write_text_atomic
from histotransfer.config import StudyConfig, validate_config
from histotransfer.errors import ConfigError
from histotransfer.layout import BUNDLE_SPEC, SUMMARY, StudyLayout, is_shard_summary, shard_summary
from histotransfer.lifecycle import command_scope
from histotransfer.logs import configure_logging
from histotransfer.manifest import SlideRecord, read_manifest, write_manifest

log = logging.getLogger(__name__)
SECTIONS = ("sample_data", "tiling", "extraction", "mil", "finetune", "cka", "export", "evaluation")


def study_config(**sections: dict[str, Any] | None) -> StudyConfig:
    """A StudyConfig from config sections given as dicts (the others keep their defaults)."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return validate_config({k: v for k, v in sections.items() if v is not None}, "pipeline parameters")


def link_tree(sources: Sequence[str | Path], root: Path) -> None:
    """Fill ``root`` with symlinks to each source's entries two levels down (``section/entry``).

    Two sources with the same entry are an error: artifacts of one study never overlap.
    """
    for source in map(Path, sources):
        if not source.is_dir():
            raise FileNotFoundError(f"input artifact {source} is not a folder")
        for section in sorted(p for p in source.iterdir() if p.is_dir()):
            target_section = root / section.name
            target_section.mkdir(parents=True, exist_ok=True)
            for entry in sorted(section.iterdir()):
                link = target_section / entry.name
                if link.exists() or link.is_symlink():
                    raise FileExistsError(f"{section.name}/{entry.name} is in two input artifacts")
                link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def harvest(root: Path, out: Path) -> list[str]:
    """Move every entry the stage created under ``root`` (not a symlink) into ``out``, same layout."""
    moved = []
    for section in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for entry in sorted(section.iterdir()):
            if entry.is_symlink():
                continue
            dest = out / section.name / entry.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry), dest)
            moved.append(f"{section.name}/{entry.name}")
    return moved


@contextmanager
def study_view(inputs: Sequence[str | Path], output: str | Path) -> Iterator[StudyLayout]:
    """The layout of a temporary study folder linking ``inputs``; what the block creates there lands
    in ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="histotransfer-view-") as tmp:
        root = Path(tmp)
        link_tree(inputs, root)
        yield StudyLayout.at(root)
        moved = harvest(root, out)
        log.info("stage outputs: %s", ", ".join(moved) or "(none)")


def shard(records: Sequence[SlideRecord], index: int, count: int) -> list[SlideRecord]:
    """Slides of shard ``index`` of ``count`` (round robin in manifest order: shards stay balanced)."""
    index, count = int(index), int(count)  # values collected by KFP arrive as floats
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    return list(records[index::count])


# ----------------------------------------------------------------------------------------------- stages


def make_cohort(output: str | Path, *, manifest: str = "", sample_data: dict | None = None) -> dict[str, Any]:
    """``cohort/manifest.csv`` (+ slides and masks for the sample cohort) under ``output``.

    ``manifest``: a local path or gs:// URI of the user's manifest; its slide paths must be absolute
    (or gs:// URIs) since the manifest moves. Empty: build the sample cohort.
    """
    layout = StudyLayout.at(output)
    if manifest:
        from histotransfer.storage import fetch_gcs, is_gcs_uri

        local = fetch_gcs(manifest) if is_gcs_uri(manifest) else Path(manifest)
        rows = [
            {
                "slide_id": r.slide_id,
                "path": r.path,
                "label": r.label,
                "patient_id": r.patient_id,
                "mpp": "" if r.mpp is None else str(r.mpp),
                "split": r.split or "",
            }
            for r in read_manifest(local)
        ]
        write_manifest(layout.manifest, rows)
    else:
        stages.sample_cohort(layout, study_config(sample_data=sample_data))
    records = read_manifest(layout.manifest)
    return {"n_slides": len(records), "labels": sorted({r.label for r in records})}


def plan(
    cohort: str | Path, *, shards: int, extraction: dict | None = None
) -> tuple[list[dict[str, int]], list[dict[str, Any]], list[str]]:
    """(tile shards, extraction items (encoder x shard), encoder ids) for a cohort."""
    n_slides = len(read_manifest(StudyLayout.at(cohort).manifest))
    count = max(1, min(int(shards), n_slides))
    config = study_config(extraction=extraction)
    tile_items = [{"shard": i, "shards": count} for i in range(count)]
    extract_items = [
        {"encoder": e.id, "weights": e.weights or "", "shard": i, "shards": count}
        for e in config.extraction.encoders
        for i in range(count)
    ]
    return tile_items, extract_items, [e.id for e in config.extraction.encoders]


def tile_shard(cohort: str | Path, output: str | Path, *, item: dict, tiling: dict | None = None):
    config = study_config(tiling=tiling)
    with study_view([cohort], output) as layout:
        records = shard(read_manifest(layout.manifest), item["shard"], item["shards"])
        summary = shard_summary(layout.tiles, item["shard"])
        result = stages.tile(layout, config, records, summary=summary)
    return _stage_stats(result)


def extract_shard(
    inputs: Sequence[str | Path], output: str | Path, *, item: dict, extraction: dict | None = None
) -> dict[str, Any]:
    config = study_config(extraction=extraction)
    with study_view(inputs, output) as layout:
        records = shard(read_manifest(layout.manifest), item["shard"], item["shards"])
        encoder_id = str(item["encoder"])
        summary = shard_summary(layout.features_dir(encoder_id), item["shard"])
        weights = item.get("weights") or None
        result = stages.extract(layout, config, records, encoder_id, weights=weights, summary=summary).result
    return _stage_stats(result)


def merge(parts: Sequence[str | Path], output: str | Path) -> list[str]:
    """Merge artifact folders of the same stage's shards: files are copied; per-shard summaries
    (``summary-shard*.csv``) become one ``summary.csv`` per folder, written atomically. Overlaps are
    errors."""
    out = Path(output)
    written = []
    summaries: dict[Path, list[dict[str, str]]] = {}
    for part in map(Path, parts):
        for path in sorted(p for p in part.rglob("*") if p.is_file()):
            rel = path.relative_to(part)
            if is_shard_summary(path):
                with path.open(newline="", encoding="utf-8") as f:
                    summaries.setdefault(rel.parent, []).extend(csv.DictReader(f))
                continue
            dest = out / rel
            if dest.exists():
                raise FileExistsError(f"{rel} is in two shards")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            written.append(str(rel))
    for folder, rows in summaries.items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        rows.sort(key=lambda r: r["slide_id"])
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(out / folder / SUMMARY, text.getvalue())
    return written


def train(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    encoder: str,
    mil: dict | None = None,
    evaluation: dict | None = None,
) -> dict[str, Any]:
    """Cross-validated MIL for one encoder; returns metrics, the pooled ROC and the confusion matrix."""
    config = study_config(mil=mil, evaluation=evaluation)
    with study_view(inputs, output) as layout:
        result = stages.train(layout, config, read_manifest(layout.manifest), encoder)
        summary = classification_summary(result.out_dir)
    return summary


def finetune(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    extraction: dict | None = None,
    mil: dict | None = None,
    finetune: dict | None = None,
    cka: dict | None = None,
    evaluation: dict | None = None,
) -> dict[str, Any]:
    """Fine-tuning of every ``finetune.encoders`` id in every fold, then MIL on its features (what
    `histotransfer run` does after the frozen study)."""
    config = study_config(extraction=extraction, mil=mil, finetune=finetune, cka=cka, evaluation=evaluation)
    metrics = {}
    with study_view(inputs, output) as layout:
        records = read_manifest(layout.manifest)
        for encoder_id in config.finetune.encoders:
            tuned = stages.finetune(layout, config, records, encoder_id)
            metrics[tuned.finetuned_id] = classification_summary(tuned.mil.out_dir)["metrics"]
    return {"metrics": metrics}


def cka(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    extraction: dict | None = None,
    finetune: dict | None = None,
    cka: dict | None = None,
) -> list[str]:
    """Frozen vs fold ``cka.fold``'s fine-tuned encoder, layer by layer, for every fine-tuned encoder."""
    config = study_config(extraction=extraction, finetune=finetune, cka=cka)
    with study_view(inputs, output) as layout:
        records = read_manifest(layout.manifest)
        paths = [stages.cka(layout, config, records, encoder_id) for encoder_id in config.finetune.encoders]
        layout.cka.mkdir(exist_ok=True)  # an empty section when nothing was fine-tuned
    return [p.name for p in paths]


def export(inputs: Sequence[str | Path], output: str | Path, *, export: dict | None = None, extraction=None):
    """The study's best model as an ONNX bundle under ``onnx/{export.name}/``."""
    config = study_config(export=export, extraction=extraction)
    with study_view(inputs, output) as layout:
        spec = stages.export(layout, config).spec
    return {"encoder": spec.encoder.id, "fold": spec.aggregator.fold, "parity": spec.parity}


REPORT_SKIPS = ("*.h5", "*.pt", "*.onnx", "*.svs", "*.tif", "*.tiff")  # large files the report never shows


def report(inputs: Sequence[str | Path], output: str | Path) -> Path:
    """``report/index.html`` and ``summary.md`` of everything in ``inputs``. The pictures and small
    files it links are copied into ``output`` too (weights, features and slides are not), so the
    folder is a self-contained report."""
    out = Path(output)
    with tempfile.TemporaryDirectory(prefix="histotransfer-report-") as tmp:
        root = Path(tmp)
        link_tree(inputs, root)
        path = stages.report(StudyLayout.at(root))
        shutil.copytree(root, out, ignore=shutil.ignore_patterns(*REPORT_SKIPS), dirs_exist_ok=True)
    return out / path.relative_to(root)


def find_bundle(path: str | Path) -> Path:
    """The bundle folder in ``path``: ``path`` itself, or its one ``onnx/{name}/``."""
    folder = Path(path)
    if (folder / BUNDLE_SPEC).is_file():
        return folder
    found = StudyLayout.at(folder).bundles()
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one bundle (bundle.json or onnx/NAME/bundle.json), found {len(found)}"
        )
    return found[0]


def predict(bundle: str | Path, slides: str, output: str | Path) -> dict[str, Any]:
    """Classify ``slides`` (slide, gs:// URI or manifest) with a bundle; torch is not imported."""
    result = stages.predict(find_bundle(bundle), slides, Path(output))
    stats = _stage_stats(result)
    rows = [o for o in result.outcomes if o.status != "failed"]
    return stats | {"predictions": {o.slide_id: o.stats.get("prediction") for o in rows}}


# --------------------------------------------------------------------------------------------- helpers


def classification_summary(mil_dir: Path) -> dict[str, Any]:
    """What a UI shows for a MIL result: scalar metrics, the pooled ROC, the confusion matrix."""
    import numpy as np
    from sklearn.metrics import confusion_matrix

    from histotransfer.mil.results import MILResult, binary_roc

    result = MILResult.load(mil_dir)
    metrics, classes = result.metrics, result.metrics["classes"]
    y, probs, predicted = result.oof_predictions()
    matrix = confusion_matrix(y, predicted, labels=list(range(len(classes)))).tolist()
    roc = None
    if (curve := binary_roc(y, probs)) is not None:
        fpr, tpr, thresholds = curve
        thresholds = np.minimum(thresholds, 1.0)  # sklearn's first threshold is +inf
        roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}
    scalars = {
        name: entry["value"] for name, entry in metrics["pooled"].items() if entry.get("value") is not None
    }
    if metrics["localisation"]["mean_auroc"] is not None:
        scalars["localisation_auroc"] = metrics["localisation"]["mean_auroc"]
    return {
        "encoder": metrics["encoder_id"],
        "metrics": scalars,
        "classes": classes,
        "confusion_matrix": matrix,
        "roc": roc,
    }


def _stage_stats(result) -> dict[str, Any]:
    failed = result.failed
    if failed and len(failed) == len(result.outcomes):
        raise RuntimeError(result.failure_report())
    if failed:
        log.warning(result.failure_report())
    return {"slides": len(result.outcomes), "failed": len(failed)}


def call(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run a stage as the CLI runs a command (components call this): logging configured, SIGTERM (a
    preempted or deleted pod) handled as Ctrl-C, the folders it locked released at the end."""
    configure_logging()
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    with command_scope():
        return fn(*args, **kwargs)
