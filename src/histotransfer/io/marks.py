"""Which files histotransfer wrote, told by their content: the mark every kind of file we write carries,
and ``is_ours``, the one test of it that output claims and atomic writes use before replacing a file.

The marks live where each format keeps metadata, so readers of the files are not disturbed:

=========  ======================================================================================
h5, JSON   a ``histotransfer_version`` attribute (h5) or top-level key (JSON)
CSV        the header of one of our tables (``CSV_HEADERS``); a sample cohort's manifest is ours only
           beside its ``cohort.json``
PNG        a ``Software`` text chunk naming histotransfer (Pillow's pnginfo, matplotlib's metadata)
HTML, md   a generator ``<meta>`` tag / an HTML comment on the first line
SVS        the sample cohort's slides name histotransfer in their ImageDescription
pt, onnx   binary files are ours when a JSON of ours beside them lists them (with their sha256) under
           ``files``
YAML       a compiled pipeline of ours (KFP's header and our components' image)
=========  ======================================================================================

Everything is read lazily and only the first bytes of a file are looked at.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from histotransfer import __version__

PRODUCER = f"histotransfer {__version__}"
MARK_KEY = "histotransfer_version"
HTML_MARK = f'<meta name="generator" content="{PRODUCER}">'
MARKDOWN_MARK = f"<!-- written by {PRODUCER} -->"
PNG_SOFTWARE = "Software"
HEAD_BYTES = 4096

# Our CSV tables by file name: each header starts with one of these column runs.
SUMMARY_HEADER = ("slide_id", "status", "reason", "seconds")
CSV_HEADERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "summary*.csv": (SUMMARY_HEADER,),
    "predictions.csv": (SUMMARY_HEADER, ("slide_id", "label", "fold", "prediction")),
    "manifest.csv": (("slide_id", "path", "label"),),
    "truncation.csv": (("encoder", "arch", "cut", "depth"),),
    "*.csv": (("fpr", "tpr"),),  # DVC's ROC points (plots/roc/{encoder}.csv)
}


def mark(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON artifact's top level with our mark first."""
    return {MARK_KEY: __version__, **{k: v for k, v in record.items() if k != MARK_KEY}}


def png_info():
    """Pillow's PngInfo carrying the mark (``image.save(..., pnginfo=png_info())``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_SOFTWARE, PRODUCER)
    return info


PNG_METADATA = {PNG_SOFTWARE: PRODUCER}  # matplotlib's savefig(metadata=...)


def is_ours(path: str | os.PathLike[str]) -> bool:
    """True when the file at ``path`` carries histotransfer's mark for its kind (see the module)."""
    path = Path(path)
    check = _CHECKS.get(path.suffix.lower())
    if check is None or not path.is_file():
        return False
    try:
        return bool(check(path))
    except Exception:  # whatever a foreign file makes a reader raise, it is not ours
        return False


def _head(path: Path, size: int = HEAD_BYTES) -> str:
    with open(path, "rb") as f:
        return f.read(size).decode("utf-8", errors="replace")


def _h5(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return MARK_KEY in f.attrs


def _json(path: Path) -> bool:
    if os.path.getsize(path) > 64 * 2**20:  # ours are small; never parse a huge foreign file
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(data, dict) and (MARK_KEY in data or data.get("format") == "histotransfer-onnx-bundle")


def _csv(path: Path) -> bool:
    import fnmatch

    first = _head(path).splitlines()[:1]
    header = tuple(c.strip() for c in next(csv.reader(io.StringIO(first[0])), [])) if first else ()
    for pattern, heads in CSV_HEADERS.items():
        if fnmatch.fnmatchcase(path.name, pattern):
            ok = any(header[: len(h)] == h for h in heads)
            return ok and (path.name != "manifest.csv" or _sample_manifest(path))
    return False


def _sample_manifest(path: Path) -> bool:
    """A sample cohort's manifest (a user's has the same columns): beside the cohort's ``cohort.json``,
    or, before that is written, listing the cohort's own slides (``slides/{id}.svs``, marked)."""
    meta = path.parent / "cohort.json"
    if meta.is_file():
        return _json(meta)
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(3), csv.DictReader(f), strict=False)]
    return bool(rows) and all(
        (row.get("path") or "").startswith("slides/") and is_ours(path.parent / row["path"]) for row in rows
    )


def _png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:  # the text chunks before the pixels: nothing is decoded
        return str(image.info.get(PNG_SOFTWARE, "")).startswith("histotransfer")


def _html(path: Path) -> bool:
    return '<meta name="generator" content="histotransfer' in _head(path)


def _markdown(path: Path) -> bool:
    return _head(path, 256).startswith("<!-- written by histotransfer")


def _tiff(path: Path) -> bool:
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a slide is large; only its header is read
    try:
        with Image.open(path) as image:
            return "histotransfer" in str(image.tag_v2.get(270, ""))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _yaml(path: Path) -> bool:
    head = _head(path)
    return head.startswith("# PIPELINE DEFINITION") and "histotransfer" in _head(path, 2**20)


def _recorded_beside(path: Path) -> bool:
    """A binary file is ours when a JSON of ours in its folder lists it under ``files`` (with its sha256,
    which ``histotransfer verify`` compares; hashing gigabytes of weights is not a claim's job)."""
    for record in sorted(path.parent.glob("*.json")):
        if not _json(record):
            continue
        files = json.loads(record.read_text(encoding="utf-8")).get("files")
        if isinstance(files, dict) and path.name in files:
            return True
    return False


_CHECKS = {
    ".h5": _h5,
    ".json": _json,
    ".csv": _csv,
    ".png": _png,
    ".html": _html,
    ".md": _markdown,
    ".svs": _tiff,
    ".yaml": _yaml,
    ".pt": _recorded_beside,
    ".onnx": _recorded_beside,
}
