"""The README is the front door (at most 200 lines, the two commands first) and the guide under docs/ is
one page per task: every relative link in them points to a file that exists, and every #anchor to a
heading of that file; `make help` lists every target."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The page without its fenced blocks (bash lines hold brackets that are not links)."""
    return FENCE.sub("", path.read_text())


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    headings = re.findall(r"^#+ (.*)$", prose(path), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first = re.search(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    assert first is not None
    assert first.group(1) == "bash"
    commands = [line.split("#")[0].strip() for line in first.group(2).splitlines()]
    assert commands[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no {path.relative_to(REPO)}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading '{anchor}' in {path.relative_to(REPO)}")
    assert not broken, broken


def test_every_guide_page_is_linked_from_the_index():
    index = prose(REPO / "docs" / "README.md")
    linked = {target.partition("#")[0] for target in LINK.findall(index)}
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_lists_every_target():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*?)(?<!\\)$", makefile, re.S | re.M).group(1)
    phony = set(phony.replace("\\", " ").split())
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert listed == phony
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines() if line.strip())  # each described


def test_the_outputs_page_shows_the_layout_as_the_code_decides_it():
    """docs/outputs.md's tree is generated from histotransfer.io.layout (`make docs-layout`)."""
    from pipelines.docs_layout import DOC, render

    text = DOC.read_text(encoding="utf-8")
    assert render(text) == text, "docs/outputs.md's layout tree is stale: run `make docs-layout`"
    assert "tiles/       {slide_id}.h5" in text
