"""Atomic file writes: an artifact appears under its final name only once it is complete."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` when the block succeeds.

    The temporary name keeps the suffix (so libraries that sniff extensions still work) and starts
    with a dot, so globs over finished artifacts never see it. On any exception the temporary file is
    removed and ``final`` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}")
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
