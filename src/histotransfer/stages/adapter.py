"""The one adapter between orchestrators (the KFP components, DVC's cohort stage) and the stages:
artifact folders in, one folder out.

Every artifact folder holds part of a study in the study layout (``cohort/``, ``tiles/``,
``features/{encoder}/``, ``mil/{encoder}/``, ``finetune/...``, ``cka/``, ``onnx/{name}/``, ``report/``).
``run_stage`` assembles a *study view* (a temporary folder of symlinks to the entries of its input
folders), runs the stage's ``for_artifacts`` on it exactly as `histotransfer run` runs the stage, and
moves what the stage created into its output folder. Inputs are never written to. Config sections
arrive as plain dicts and are validated by the same schema as ``params.yaml``. No kfp import here:
components only call these functions.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from histotransfer import stages
from histotransfer.core.config import StudyConfig, validate_config
from histotransfer.core.errors import ConfigError
from histotransfer.core.logs import configure_logging
from histotransfer.io.atomic import write_text_atomic
from histotransfer.io.layout import BUNDLE_SPEC, SUMMARY, StudyLayout, is_shard_summary
from histotransfer.io.lifecycle import command_scope
from histotransfer.io.manifest import read_manifest
from histotransfer.stages.common import stage_stats

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


# ----------------------------------------------------------------------------------------------- stages

STAGES = ("cohort", "tile", "extract", "train", "finetune", "cka", "export")  # those run in a study view


def run_stage(
    stage: str,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    sections: Mapping[str, dict[str, Any] | None] | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Run ``stage`` (one of STAGES) on the artifact folders ``inputs`` into ``output`` with the config
    ``sections`` (dicts, validated; the others keep their defaults) and the stage's own ``args``;
    returns what the stage reports for the orchestrator's UI (counts, metrics, files, failures)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages run on artifacts: {', '.join(STAGES)}")
    module = importlib.import_module(f"histotransfer.stages.{stage}")
    config = study_config(**(sections or {}))
    with study_view(inputs, output) as layout:
        return module.for_artifacts(layout, config, **args)


def plan(
    cohort: str | Path, *, shards: int, extraction: dict | None = None
) -> tuple[list[dict[str, int]], list[dict[str, Any]], list[str]]:
    """(tile shards, extraction items (encoder x shard), encoder ids) for a cohort."""
    n_slides = len(read_manifest(StudyLayout.at(cohort).manifest))
    count = max(1, min(int(shards), n_slides))
    config = study_config(extraction=extraction)
    tile_items = [{"shard": i, "shards": count} for i in range(count)]
    extract_items = [
        {"encoder": e.id, "shard": i, "shards": count} | ({"weights": e.weights} if e.weights else {})
        for e in config.extraction.encoders
        for i in range(count)
    ]
    return tile_items, extract_items, [e.id for e in config.extraction.encoders]


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


REPORT_SKIPS = ("*.h5", "*.pt", "*.onnx", "*.svs", "*.tif", "*.tiff")  # large files the report never shows


def report_folder(inputs: Sequence[str | Path], output: str | Path) -> Path:
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


def classify(bundle: str | Path, slides: str, output: str | Path) -> dict[str, Any]:
    """Classify ``slides`` (slide, gs:// URI or manifest) with a bundle; torch is not imported."""
    result = stages.predict(find_bundle(bundle), slides, Path(output))
    stats = stage_stats(result)
    rows = [o for o in result.outcomes if o.status != "failed"]
    return stats | {"predictions": {o.slide_id: o.stats.get("prediction") for o in rows}}


def call(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run a stage as the CLI runs a command (components call this): logging configured, SIGTERM (a
    preempted or deleted pod) handled as Ctrl-C, the folders it locked released at the end."""
    configure_logging()
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    with command_scope():
        return fn(*args, **kwargs)
