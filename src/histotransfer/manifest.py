"""The cohort manifest (CSV): reading and validating it before any work starts.

Required columns ``slide_id,path,label``; optional ``patient_id`` (the unit of data splits, defaults to
slide_id), ``mpp`` (used when the slide records no resolution) and ``split`` (train/val/test). Other
columns are kept but ignored. Relative local paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from histotransfer.atomic import atomic_path
from histotransfer.errors import ManifestError
from histotransfer.storage import StorageError, is_gcs_uri, parse_gcs_uri

REQUIRED_COLUMNS = ("slide_id", "path", "label")
SPLITS = ("train", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    path: str  # absolute local path or gs:// URI
    label: str
    patient_id: str
    mpp: float | None = None
    split: str | None = None
    line: int = 0  # line of the manifest this record came from (header is line 1)


def check_slide_id(slide_id: str) -> str | None:
    """Why ``slide_id`` is unsafe as a file name, or None when it is fine."""
    if not slide_id:
        return "slide_id is empty"
    if not _SAFE_ID.match(slide_id):
        return (
            f"slide_id {slide_id!r} is unsafe: use only letters, digits, '.', '_' and '-', "
            "not starting with '.' (it becomes a file name)"
        )
    return None


def _parse_row(
    row: dict[str, str], line: int, base: Path, seen: dict[str, int], *, labels: bool = True
) -> tuple[SlideRecord | None, list[str]]:
    problems: list[str] = []
    slide_id = (row.get("slide_id") or "").strip()
    if why := check_slide_id(slide_id):
        problems.append(why)
    elif slide_id in seen:
        problems.append(f"slide_id {slide_id!r} duplicates line {seen[slide_id]}")
    else:
        seen[slide_id] = line
    label = (row.get("label") or "").strip()
    if labels and not label:
        problems.append("label is empty")
    raw_path = (row.get("path") or "").strip()
    path = raw_path
    if not raw_path:
        problems.append("path is empty")
    elif is_gcs_uri(raw_path):
        try:
            parse_gcs_uri(raw_path)
        except StorageError as exc:
            problems.append(str(exc))
    else:
        local = Path(raw_path).expanduser()
        local = local if local.is_absolute() else base / local
        path = str(local.resolve())
        if not local.is_file():
            problems.append(f"slide file {raw_path!r} not found (looked at {local})")
    mpp = None
    if raw_mpp := (row.get("mpp") or "").strip():
        try:
            mpp = float(raw_mpp)
            if not mpp > 0:
                raise ValueError
        except ValueError:
            problems.append(f"mpp {raw_mpp!r} is not a positive number of microns per pixel")
            mpp = None
    split = (row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        problems.append(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if problems:
        return None, problems
    patient_id = (row.get("patient_id") or "").strip() or slide_id
    return SlideRecord(slide_id, path, label, patient_id, mpp, split, line), []


def read_manifest(path: str | Path, *, labels: bool = True) -> list[SlideRecord]:
    """Parse and validate a manifest; raise ManifestError listing every problem by line.

    ``labels=False`` (slides to classify): the ``label`` column is optional and may be empty.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"manifest {path} line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it "
            "as UTF-8 CSV (e.g. in Excel: CSV UTF-8; or iconv -f latin1 -t utf-8)"
        ) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        required = REQUIRED_COLUMNS if labels else tuple(c for c in REQUIRED_COLUMNS if c != "label")
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(
                f"manifest {path} lacks required column(s) {', '.join(missing)}; "
                f"found {', '.join(columns) or 'no header'}; required: {', '.join(required)}"
            )
        reader.fieldnames = columns
        records: list[SlideRecord] = []
        errors: list[str] = []
        seen: dict[str, int] = {}
        for line_no, row in enumerate(reader, start=2):
            record, problems = _parse_row(row, line_no, path.parent, seen, labels=labels)
            errors += [f"{path} line {line_no}: {p}" for p in problems]
            if record:
                records.append(record)
    if errors:
        raise ManifestError(f"manifest {path} has {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    if not records:
        raise ManifestError(f"manifest {path} lists no slides")
    return records


def write_manifest(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Write manifest rows (dicts with at least the required columns) atomically."""
    columns = list(REQUIRED_COLUMNS) + sorted({k for r in rows for k in r} - set(REQUIRED_COLUMNS))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
