"""Atomic file writes: an artifact appears under its final name only once it is complete."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` when the block succeeds.

    The temporary name starts with a dot and ends in ``.partial``, so neither a glob over finished
    artifacts (``*.h5``) nor a reader sees it; writers that pick a format from the extension must be
    told the format explicitly. On any exception the temporary file is
    removed and ``final`` is left exactly as it was. Leftovers of a process killed mid-write (which
    never got to clean up) are removed before the new write starts.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        stale.unlink(missing_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``final`` atomically and return the final path."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(final)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; swap it in for ``final`` when the block succeeds.

    Readers see the old folder or the complete new one, never a mix: the old one is renamed aside,
    the staged one renamed into place, then the old one deleted. On an exception the staging folder is
    removed and ``final`` is untouched. Leftovers of a killed process are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    token = uuid.uuid4().hex[:8]
    staging = final.with_name(f".{final.name}.{token}.partial")
    staging.mkdir()
    try:
        yield staging
        old = final.with_name(f".{final.name}.{token}.old.partial")
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
