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

from histotransfer.config import StudyConfig, validate_config
from histotransfer.errors import ConfigError
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
def study_view(inputs: Sequence[str | Path], output: str | Path) -> Iterator[Path]:
    """A temporary study folder linking ``inputs``; what the block creates there lands in ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="histotransfer-view-") as tmp:
        root = Path(tmp)
        link_tree(inputs, root)
        yield root
        moved = harvest(root, out)
        log.info("stage outputs: %s", ", ".join(moved) or "(none)")


def _manifest(root: Path) -> Path:
    path = root / "cohort" / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the cohort artifact must hold cohort/manifest.csv")
    return path


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
    out = Path(output) / "cohort"
    if manifest:
        from histotransfer.storage import fetch_gcs, is_gcs_uri

        local = fetch_gcs(manifest) if is_gcs_uri(manifest) else Path(manifest)
        records = read_manifest(local)
        rows = [
            {
                "slide_id": r.slide_id,
                "path": r.path,
                "label": r.label,
                "patient_id": r.patient_id,
                "mpp": "" if r.mpp is None else str(r.mpp),
                "split": r.split or "",
            }
            for r in records
        ]
        write_manifest(out / "manifest.csv", rows)
    else:
        from histotransfer.sample_data import build_sample_cohort

        build_sample_cohort(out, config=study_config(sample_data=sample_data).sample_data)
    records = read_manifest(out / "manifest.csv")
    labels = sorted({r.label for r in records})
    return {"n_slides": len(records), "labels": labels}


def plan(
    cohort: str | Path, *, shards: int, extraction: dict | None = None
) -> tuple[list[dict[str, int]], list[dict[str, Any]], list[str]]:
    """(tile shards, extraction items (encoder x shard), encoder ids) for a cohort."""
    n_slides = len(read_manifest(_manifest(Path(cohort))))
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
    from histotransfer.tiling import tile_cohort

    config = study_config(tiling=tiling)
    with study_view([cohort], output) as root:
        records = shard(read_manifest(_manifest(root)), item["shard"], item["shards"])
        result = tile_cohort(records, out_dir=root / "tiles", tiling=config.tiling)
        (root / "tiles" / "summary.csv").rename(root / "tiles" / f"summary-shard{int(item['shard'])}.csv")
    return _stage_stats(result)


def extract_shard(
    inputs: Sequence[str | Path], output: str | Path, *, item: dict, extraction: dict | None = None
) -> dict[str, Any]:
    from histotransfer.encoders import build_encoder
    from histotransfer.extraction import extract_cohort, settings_from

    config = study_config(extraction=extraction)
    with study_view(inputs, output) as root:
        tiled = _tiled_records(root)
        records = shard(tiled, item["shard"], item["shards"])
        encoder = build_encoder(item["encoder"], weights=item.get("weights") or None)
        dest = root / "features" / str(encoder.id)
        result = extract_cohort(
            records,
            tiles_dir=root / "tiles",
            out_dir=root / "features",
            encoder=encoder,
            settings=settings_from(config.extraction),
        )
        (dest / "summary.csv").rename(dest / f"summary-shard{int(item['shard'])}.csv")
    return _stage_stats(result)


def merge(parts: Sequence[str | Path], output: str | Path) -> list[str]:
    """Merge artifact folders of the same stage's shards: files are copied; per-shard
    ``summary-shard*.csv`` files become one ``summary.csv`` per folder. Overlaps are errors."""
    out = Path(output)
    written = []
    summaries: dict[Path, list[dict[str, str]]] = {}
    for part in map(Path, parts):
        for path in sorted(p for p in part.rglob("*") if p.is_file()):
            rel = path.relative_to(part)
            if path.name.startswith("summary-shard") and path.suffix == ".csv":
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
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "summary.csv").write_text(text.getvalue(), encoding="utf-8")
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
    from histotransfer.mil_stage import LesionMasks, train_mil

    config = study_config(mil=mil, evaluation=evaluation)
    with study_view(inputs, output) as root:
        records = _featured_records(root, encoder)
        result = train_mil(
            records,
            features_dir=root / "features" / encoder,
            out_dir=root / "mil",
            mil=config.mil,
            evaluation=config.evaluation,
            tiles_dir=root / "tiles",
            lesion_masks=LesionMasks.beside(_manifest(root)),
        )
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
    from histotransfer.finetune_stage import finetuned_id
    from histotransfer.study import finetune_and_compare

    config = study_config(extraction=extraction, mil=mil, finetune=finetune, cka=cka, evaluation=evaluation)
    with study_view(inputs, output) as root:
        outputs = _study_outputs(root)
        finetune_and_compare(config, outputs, _tiled_records(root), cka=False)
        tuned = {finetuned_id(e) for e in config.finetune.encoders}
        metrics = {
            r.encoder_id: classification_summary(r.out_dir)["metrics"]
            for r in outputs.mil
            if r.encoder_id in tuned
        }
    if outputs.errors:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in outputs.errors.items()))
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
    from histotransfer.study import compare_finetuned

    config = study_config(extraction=extraction, finetune=finetune, cka=cka)
    with study_view(inputs, output) as root:
        outputs = _study_outputs(root)
        for encoder_id in config.finetune.encoders:
            compare_finetuned(config, outputs, _tiled_records(root), encoder_id)
        (root / "cka").mkdir(exist_ok=True)  # an empty section when nothing was fine-tuned
    if outputs.errors:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in outputs.errors.items()))
    return [p.name for p in outputs.cka]


def export(inputs: Sequence[str | Path], output: str | Path, *, export: dict | None = None, extraction=None):
    """The study's best model as an ONNX bundle under ``onnx/{export.name}/``."""
    from histotransfer.export import best_result, export_study_model
    from histotransfer.mil_stage import MILResult

    config = study_config(export=export, extraction=extraction)
    with study_view(inputs, output) as root:
        results = MILResult.load_all(root / "mil")
        best = best_result(results)
        result = export_study_model(
            best.out_dir,
            out=root / "onnx" / config.export.name,
            weights=config.extraction.weights_for(best.encoder_id),
            fold=config.export.fold,
            tiles_dir=root / "tiles",
            fp16=config.export.fp16,
        )
        spec = result.spec
    return {"encoder": spec.encoder.id, "fold": spec.aggregator.fold, "parity": spec.parity}


REPORT_SKIPS = ("*.h5", "*.pt", "*.onnx", "*.svs", "*.tif", "*.tiff")  # large files the report never shows


def report(inputs: Sequence[str | Path], output: str | Path) -> Path:
    """``report/index.html`` and ``summary.md`` of everything in ``inputs``. The pictures and small
    files it links are copied into ``output`` too (weights, features and slides are not), so the
    folder is a self-contained report."""
    from histotransfer.mil_stage import MILResult
    from histotransfer.report import write_report

    out = Path(output)
    with tempfile.TemporaryDirectory(prefix="histotransfer-report-") as tmp:
        root = Path(tmp)
        link_tree(inputs, root)
        results = MILResult.load_all(root / "mil")
        bundles = sorted(p.parent for p in (root / "onnx").glob("*/bundle.json"))
        path = write_report(
            results,
            report_dir=root / "report",
            tiles_dir=root / "tiles",
            cka=sorted((root / "cka").glob("*.json")),
            bundle=bundles[0] if bundles else None,
        )
        shutil.copytree(root, out, ignore=shutil.ignore_patterns(*REPORT_SKIPS), dirs_exist_ok=True)
    return out / path.relative_to(root)


def find_bundle(path: str | Path) -> Path:
    """The bundle folder in ``path``: ``path`` itself, or its one ``onnx/{name}/``."""
    folder = Path(path)
    if (folder / "bundle.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.glob("onnx/*/bundle.json"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one bundle (bundle.json or onnx/NAME/bundle.json), found {len(found)}"
        )
    return found[0]


def predict(bundle: str | Path, slides: str, output: str | Path) -> dict[str, Any]:
    """Classify ``slides`` (slide, gs:// URI or manifest) with a bundle; torch is not imported."""
    from histotransfer.bundle import load_bundle
    from histotransfer.predict import predict_cohort, slides_to_classify

    loaded = load_bundle(find_bundle(bundle))
    result = predict_cohort(slides_to_classify(slides), loaded, out_dir=Path(output))
    stats = _stage_stats(result)
    rows = [o for o in result.outcomes if o.status != "failed"]
    return stats | {"predictions": {o.slide_id: o.stats.get("prediction") for o in rows}}


# --------------------------------------------------------------------------------------------- helpers


def classification_summary(mil_dir: Path) -> dict[str, Any]:
    """What a UI shows for a MIL result: scalar metrics, the pooled ROC, the confusion matrix."""
    import numpy as np
    from sklearn.metrics import confusion_matrix

    from histotransfer.mil_stage import MILResult, binary_roc

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


def _study_outputs(root: Path):
    from histotransfer.study import StudyOutputs

    return StudyOutputs(
        manifest=_manifest(root),
        tiles_dir=root / "tiles",
        features_dir=root / "features",
        mil_dir=root / "mil",
    )


def _stage_stats(result) -> dict[str, Any]:
    failed = result.failed
    if failed and len(failed) == len(result.outcomes):
        raise RuntimeError(result.failure_report())
    if failed:
        log.warning(result.failure_report())
    return {"slides": len(result.outcomes), "failed": len(failed)}


def _tiled_records(root: Path) -> list[SlideRecord]:
    """The cohort's slides that have a tiles file (failed slides are left out, as `run` does)."""
    return [r for r in read_manifest(_manifest(root)) if (root / "tiles" / f"{r.slide_id}.h5").is_file()]


def _featured_records(root: Path, encoder: str) -> list[SlideRecord]:
    folder = root / "features" / encoder
    records = [r for r in _tiled_records(root) if (folder / f"{r.slide_id}.h5").is_file()]
    if not records:
        raise FileNotFoundError(f"no features for {encoder} in the input artifacts ({folder})")
    return records


def call(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run a stage with logging configured as the CLI does (components call this)."""
    configure_logging()
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    return fn(*args, **kwargs)
