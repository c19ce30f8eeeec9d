"""The study layout's tree in docs/outputs.md, generated from histotransfer.io.layout (its docstring is the
one description of the sections): `make docs-layout` rewrites the block, tests/test_docs.py fails when it
is stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from histotransfer.io import layout

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
BEGIN, END = (
    "<!-- layout: generated from histotransfer/io/layout.py by `make docs-layout` -->",
    "<!-- /layout -->",
)


def tree() -> str:
    """The sections block of histotransfer.io.layout's docstring, as a fenced block."""
    doc = layout.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.removeprefix("    ") for line in block.splitlines()]
    return "```text\n" + "\n".join(lines) + "\n```"


def render(text: str) -> str:
    """``text`` (the page) with its generated block replaced by the current tree."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{tree()}\n{END}", text)


def main() -> int:
    DOC.write_text(render(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
