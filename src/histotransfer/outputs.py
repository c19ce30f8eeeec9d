"""Preflight of output folders: a command writes only into a folder that is new, empty, or recognisably
one of its own artifacts, never over what the tool did not write.

Every command names its output folder(s) with ``claim_output`` before it touches the first slide or
builds a model. A folder is accepted when it does not exist yet (it is created), is empty, or holds
only entries of the kind of artifact the command writes there (the names in ``KINDS``, which follow
the study layout). Otherwise the command stops with an OutputError (exit status 2) that names the
folder, a few entries that are not ours, and the fix. The same check refuses an output folder that is a
file, that cannot be created or written, or that overlaps a folder the command reads.

Recognition is by content, not by a marker file: artifact folders are merged, linked and uploaded by
the orchestrators as they are, and folders written by earlier versions are still recognised.
"""

from __future__ import annotations

import fnmatch
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from histotransfer.errors import OutputError
from histotransfer.layout import BUNDLE_SPEC, COHORT_META, ENCODER_ID, MANIFEST, SUMMARY

OURS_SAMPLE = 32  # files opened to tell our tiles files from another tool's of the same names
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{8}(\.old)?\.partial$")  # histotransfer.atomic's temporary names


def _is_encoder_dir(entry: Path) -> bool:
    """A folder named by an encoder id (features/, mil/ and finetune/ hold one per encoder)."""
    return entry.is_dir() and ENCODER_ID.match(entry.name) is not None


def _ours_if_h5(entry: Path) -> bool:
    """An h5 file is ours only when it carries our provenance (CLAM's patch files are named alike)."""
    if entry.suffix != ".h5":
        return True
    from histotransfer.provenance import made_here  # h5py: only when a folder is checked

    return made_here(entry)


def _unfinished_sample_cohort(folder: Path) -> bool:
    """A sample cohort whose first run stopped before its manifest: only ``sample-*`` slides and masks."""
    files = [
        f
        for sub in ("slides", "masks", "artefacts")
        if (folder / sub).is_dir()
        for f in (folder / sub).iterdir()
    ]
    return bool(files) and all(f.name.startswith(("sample-", ".sample-")) for f in files)


@dataclass(frozen=True)
class Kind:
    """What one kind of output folder holds: glob patterns of its entries (``NAME/`` for a folder,
    or a predicate), and which of them mark it as ours when it is not empty."""

    what: str
    entries: tuple[str, ...] = ()
    marks: tuple[str, ...] = ()
    predicate: Callable[[Path], bool] | None = None  # entries recognised by more than their name
    ours: Callable[[Path], bool] | None = None  # of the files named like ours, is this one ours? (sampled)
    unfinished: Callable[[Path], bool] | None = None  # the folder is an interrupted first run of ours
    whole: bool = False  # the command replaces the folder as a whole: nothing else may be in it

    def matches(self, entry: Path, patterns: Iterable[str]) -> bool:
        for pattern in patterns:
            if pattern.endswith("/"):
                if entry.is_dir() and fnmatch.fnmatchcase(entry.name, pattern[:-1]):
                    return True
            elif not entry.is_dir() and fnmatch.fnmatchcase(entry.name, pattern):
                return True
        return self.predicate is not None and self.predicate(entry)

    def foreign(self, folder: Path) -> list[str]:
        """Entries of ``folder`` that this kind of artifact never has (all of them when none marks it)."""
        entries = sorted(folder.iterdir())
        partial = [e for e in entries if _PARTIAL.match(e.name)]  # left by an interrupted write of ours
        if not self.whole:  # dotfiles (.gitignore, .DS_Store) are left alone by additive writers
            entries = [e for e in entries if not e.name.startswith(".")]
        else:
            entries = [e for e in entries if e not in partial]
        named = [e for e in entries if self.matches(e, self.entries)]
        foreign = [e.name for e in entries if e not in named]
        if self.ours is not None:  # the first files say whose folder it is; a mixed one is not expected
            foreign += [e.name for e in named[:OURS_SAMPLE] if not self.ours(e)]
        marked = (
            partial
            or any(self.matches(e, self.marks) for e in entries)
            or (self.unfinished is not None and self.unfinished(folder))
        )
        if entries and not foreign and not marked:
            return [e.name for e in entries]  # only names we also use, but nothing that marks it ours
        return foreign


KINDS: dict[str, Kind] = {
    "cohort": Kind(  # cohort.json is written last; a user's own cohort (manifest.csv, slides/) is not ours
        "a sample cohort",
        (MANIFEST, COHORT_META, "slides/", "masks/", "artefacts/"),
        (COHORT_META,),
        unfinished=_unfinished_sample_cohort,
    ),
    "tiles": Kind(
        "tiles", ("*.h5", "*.png", "*.jpg", "summary*.csv"), ("*.h5", "summary*.csv"), ours=_ours_if_h5
    ),
    "features": Kind("features (one folder per encoder id)", marks=("*/",), predicate=_is_encoder_dir),
    "mil": Kind("MIL results (one folder per encoder id)", marks=("*/",), predicate=_is_encoder_dir),
    "finetune": Kind(
        "fine-tuning results (one folder per encoder id)", marks=("*/",), predicate=_is_encoder_dir
    ),
    "cka": Kind("CKA comparisons", ("*__*.json", "*__*.png"), ("*__*.json",)),
    "bundle": Kind(
        "an ONNX bundle", (BUNDLE_SPEC, "encoder.onnx", "aggregator.onnx"), (BUNDLE_SPEC,), whole=True
    ),
    "report": Kind("a study report", ("index.html", "summary.md", "figures/"), ("index.html", "summary.md")),
    "plots": Kind("DVC plots", ("roc/", "*.csv", "*.json"), ("roc/",)),
    "predictions": Kind(
        "predictions",
        ("predictions.csv", SUMMARY, "slides/", "heatmaps/", "tiles/"),
        ("predictions.csv", SUMMARY),
    ),
}


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def claim_output(
    folder: str | os.PathLike[str],
    kind: str,
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Check that ``folder`` may receive a ``kind`` artifact, create it and prove it writable.

    ``inputs``: folders (or files) the command reads; the output may neither lie inside one nor
    contain one. Raises OutputError naming the folder and the fix; returns the folder.
    """
    spec = KINDS[kind]
    folder = Path(folder)
    where = f"the output folder {folder}"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise OutputError(f"{where} {what}, not a folder: give a new or empty folder (the file is kept)")
    resolved = folder.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _overlap(resolved, source):
            relation = "is" if resolved == source else "overlaps"
            raise OutputError(f"{where} {relation} the input {given}: write outputs to a folder of their own")
    if folder.is_dir():
        try:
            foreign = spec.foreign(folder)
        except OSError as exc:
            raise OutputError(f"{where} cannot be listed ({exc.strerror}): check its permissions") from exc
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise OutputError(
                f"{where} holds files that are not {spec.what} written by histotransfer ({shown}); "
                "nothing was changed: give a new or empty folder"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".histotransfer-write-check.{uuid.uuid4().hex[:8]}.partial"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"{where} cannot be written ({reason}{f': {exc.filename}' if exc.filename else ''}): "
            "give a folder you can write to"
        ) from exc
    return folder
