"""The cohort manifest (CSV): reading and validating it before any work starts.

Required columns ``slide_id,path,label``; optional ``patient_id`` (the unit of data splits, defaults to
slide_id), ``mpp`` (used when the slide records no resolution), ``split`` (train/val/test) and ``site``
(where the slide was scanned: site-held-out evaluation, ``evaluation.cv: site``). Other columns are kept
but ignored. Relative local paths are relative to the manifest's folder.

A slide file has one slide id (symbolic and hard links are the same file; a gs:// URI is its text), a
class is spelled one way (not ``Tumor`` and ``tumor``), and an ``mpp`` is one slides can have. Every
problem is reported with its line, where a row starts in the file.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histotransfer.core.config import PLAUSIBLE_MPP, short_repr, short_text
from histotransfer.core.errors import ManifestError
from histotransfer.io.atomic import atomic_path
from histotransfer.io.storage import StorageError, is_gcs_uri, parse_gcs_uri

REQUIRED_COLUMNS = ("slide_id", "path", "label")
SPLITS = ("train", "val", "test")
MAX_SLIDE_ID = 200  # file systems allow 255 bytes a name, and outputs add suffixes to the id
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
    site: str | None = None  # the scanning site (the manifest's `site` column), None when not given


def check_slide_id(slide_id: str) -> str | None:
    """Why ``slide_id`` is unsafe as a file name, or None when it is fine."""
    if not slide_id:
        return "slide_id is empty"
    if len(slide_id) > MAX_SLIDE_ID:
        return (
            f"slide_id {short_repr(slide_id)} has {len(slide_id):,} characters: at most {MAX_SLIDE_ID} "
            "(it becomes a file name)"
        )
    if not _SAFE_ID.match(slide_id):
        return (
            f"slide_id {short_repr(slide_id)} is unsafe: use only letters, digits, '.', '_' and '-', "
            "not starting with '.' (it becomes a file name)"
        )
    return None


MAX_LISTED_PROBLEMS = 50
_SPAN_CHECKED = ("slide_id", "path", "label", "patient_id", "site")  # text that must stay on its own line
_CHECK_QUOTING = (
    "check its quoting: a field that starts with a quote runs to the next quote, so a stray or missing "
    "quote swallows the lines after it (a quote inside a quoted field is written twice)"
)


@dataclass(frozen=True)
class _Row:
    line: int  # where the row starts (the header is line 1)
    end_line: int  # where it ends: later than line when a quoted field holds line breaks
    values: dict[str, str]
    extra: list[str]  # fields beyond the header's columns


def _csv_rows(text: str, path: Path) -> tuple[list[str], list[_Row]]:
    """(columns, rows) of a manifest's text; a CSV error names the line where its row starts."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    columns: list[str] | None = None
    rows: list[_Row] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return columns or [], rows
        except csv.Error as exc:
            raise ManifestError(
                f"manifest {path} line {start}: cannot be read as CSV ({exc}); {_CHECK_QUOTING}"
            ) from None
        if columns is None:
            columns = [c.strip() for c in fields]
        elif fields:  # a blank line is no row
            values = dict(zip(columns, fields, strict=False))
            rows.append(_Row(start, reader.line_num, values, fields[len(columns) :]))


def local_slide_file(raw: str, base: Path) -> tuple[str, tuple[int, int] | None, str | None]:
    """(absolute path, (st_dev, st_ino), None) for a local slide file named ``raw`` (relative to
    ``base``), else (path, None, why it cannot be used). The inode identifies the file behind any
    symbolic or hard link."""
    shown = short_repr(raw, limit=300)
    try:
        local = Path(raw).expanduser()
    except RuntimeError:  # `~name/...` of a user this machine does not know
        return raw, None, f"slide path {shown}: no home folder for its '~'; give the full path"
    local = local if local.is_absolute() else base / local
    try:
        resolved = local.resolve()
        info = resolved.stat()
        readable = os.access(resolved, os.R_OK)
    except ValueError:  # a NUL character
        return raw, None, f"slide path {shown} contains a NUL character"
    except RuntimeError:  # Python 3.11's Path.resolve on a loop (later versions raise OSError ELOOP)
        return str(local), None, f"slide file {shown} is a symbolic link that loops back to itself"
    except (FileNotFoundError, NotADirectoryError):
        return str(local), None, f"slide file {shown} not found (looked at {local})"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return str(local), None, f"slide file {shown} is a symbolic link that loops back to itself"
        return str(local), None, f"slide file {shown} cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return str(resolved), None, f"slide file {shown} is not a file (looked at {resolved})"
    if not readable:
        why = "permission denied: give the user running histotransfer read access"
        return str(resolved), None, f"slide file {shown} cannot be read ({why})"
    return str(resolved), (info.st_dev, info.st_ino), None


def _slide_path(raw: str, base: Path) -> tuple[str, tuple[Any, ...] | None, str | None]:
    """(path, what identifies the file, None) or (path, None, problem): gs:// URIs by their text."""
    if not raw:
        return raw, None, "path is empty"
    if is_gcs_uri(raw):
        try:
            parse_gcs_uri(raw)
        except StorageError as exc:
            return raw, None, str(exc)
        return raw, ("gs", raw), None
    return local_slide_file(raw, base)


def _parse_mpp(raw: str) -> tuple[float | None, str | None]:
    if not raw:
        return None, None
    low, high = PLAUSIBLE_MPP
    try:
        mpp = float(raw)
    except ValueError:
        return None, f"mpp {short_repr(raw)} is not a number of microns per pixel"
    if not low <= mpp <= high:  # NaN included
        return None, (
            f"mpp {short_repr(raw)} is outside {low:g} to {high:g} microns per pixel, the resolutions "
            "slides have (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
        )
    return mpp, None


def _parse_row(
    row: _Row, base: Path, seen: dict[str, int], *, labels: bool = True
) -> tuple[SlideRecord | None, tuple[Any, ...] | None, list[str]]:
    """(record, the file's identity, problems) of one manifest row."""
    problems = [
        f"{name} spans lines {row.line} to {row.end_line} (a line break inside quotes); {_CHECK_QUOTING}"
        for name in _SPAN_CHECKED
        if "\n" in row.values.get(name, "") or "\r" in row.values.get(name, "")
    ]
    if any(field.strip() for field in row.extra):
        problems.append(
            f"has {len(row.values) + len(row.extra)} fields but the header names {len(row.values)}: "
            "a value holding a comma must be in quotes"
        )
    slide_id = row.values.get("slide_id", "").strip()
    if why := check_slide_id(slide_id):
        problems.append(why)
    elif slide_id in seen:
        problems.append(f"slide_id {short_repr(slide_id)} duplicates line {seen[slide_id]}")
    else:
        seen[slide_id] = row.line
    label = row.values.get("label", "").strip()
    if labels and not label:
        problems.append("label is empty")
    path, identity, why = _slide_path(row.values.get("path", "").strip(), base)
    mpp, why_mpp = _parse_mpp(row.values.get("mpp", "").strip())
    split = row.values.get("split", "").strip().lower() or None
    if split is not None and split not in SPLITS:
        problems.append(f"split {short_repr(split)} is not one of {', '.join(SPLITS)}")
    problems += [p for p in (why, why_mpp) if p]
    if problems:
        return None, identity, problems
    patient_id = row.values.get("patient_id", "").strip() or slide_id
    site = row.values.get("site", "").strip() or None
    return SlideRecord(slide_id, path, label, patient_id, mpp, split, row.line, site), identity, []


def _same_file_problem(first: tuple[int, str], line: int, slide_id: str, path: str) -> str:
    return (
        f"lines {first[0]} and {line} list the same slide file {short_repr(path, limit=300)} (as "
        f"{short_repr(first[1])} and {short_repr(slide_id)}); one slide must have one id (a copy under "
        "two ids would be trained on and tested on)"
    )


def _label_key(label: str) -> str:
    return "".join(unicodedata.normalize("NFKC", label).split()).casefold()


def _spelling_problems(rows: list[_Row]) -> list[str]:
    """Labels that differ only in case, spacing or Unicode form: one problem per class, by line."""
    spellings: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        if label := row.values.get("label", "").strip():
            spellings.setdefault(_label_key(label), {}).setdefault(label, []).append(row.line)
    problems = []
    for variants in spellings.values():
        if len(variants) > 1:
            lines = sorted(n for found in variants.values() for n in found)
            listed = ", ".join(f"{short_repr(v)} ({_lines(found)})" for v, found in variants.items())
            problems.append(
                f"{_lines(lines)}: labels {listed} differ only in case or spacing, so they would be "
                "different classes: spell each class one way"
            )
    return problems


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:6])) + (f", ... ({len(numbers)} in all)" if len(numbers) > 6 else "")
    return f"line {shown}" if len(numbers) == 1 else f"lines {shown}"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"manifest {path} line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it "
            "as UTF-8 CSV (e.g. in Excel: CSV UTF-8; or iconv -f latin1 -t utf-8)"
        ) from None


def _check_columns(path: Path, columns: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        found = short_text(", ".join(columns)) or "no header"
        raise ManifestError(
            f"manifest {path} lacks required column(s) {', '.join(missing)}; "
            f"found {found}; required: {', '.join(required)}"
        )
    if twice := sorted({c for c in columns if c and columns.count(c) > 1}):
        raise ManifestError(
            f"manifest {path} line 1: the header names column(s) {short_text(', '.join(twice))} twice; "
            "keep one of each"
        )


def read_manifest(path: str | Path, *, labels: bool = True) -> list[SlideRecord]:
    """Parse and validate a manifest; raise ManifestError listing every problem by line.

    ``labels=False`` (slides to classify): the ``label`` column is optional and may be empty.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file (a folder, a device or a pipe)" if path.exists() else "not found"
        raise ManifestError(f"manifest {path} {what}: give the cohort's CSV file")
    columns, rows = _csv_rows(_decode(path), path)
    _check_columns(path, columns, REQUIRED_COLUMNS if labels else ("slide_id", "path"))
    records: list[SlideRecord] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    files: dict[tuple[Any, ...], tuple[int, str]] = {}  # file identity -> (line, slide_id)
    for row in rows:
        record, identity, problems = _parse_row(row, path.parent, seen, labels=labels)
        slide_id = row.values.get("slide_id", "").strip()
        first = files.setdefault(identity, (row.line, slide_id)) if identity else None
        if first is not None and first[1] != slide_id:
            problems.append(_same_file_problem(first, row.line, slide_id, row.values["path"].strip()))
            record = None
        errors += [f"{path} line {row.line}: {p}" for p in problems]
        if record:
            records.append(record)
    if labels:
        errors += [f"{path} {p}" for p in _spelling_problems(rows)]
    if errors:
        shown = errors[:MAX_LISTED_PROBLEMS]
        if len(errors) > MAX_LISTED_PROBLEMS:
            shown.append(f"... and {len(errors) - MAX_LISTED_PROBLEMS} more")
        raise ManifestError(f"manifest {path} has {len(errors)} problem(s):\n  " + "\n  ".join(shown))
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
