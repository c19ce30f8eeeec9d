"""Preflight of output folders: a command writes only into a folder that is new, empty, or holds only
what that kind of artifact holds, written by histotransfer; and only one command writes it at a time.

Every command names its output folder(s) with ``claim_output`` before it touches the first slide or
builds a model. A folder is accepted when it does not exist yet (it is created), is empty, or holds only
entries of the kind of artifact the command writes there (``KINDS``: names, and sub-folders of their own
kinds, following the study layout) whose content says histotransfer wrote them (histotransfer.io.marks; the
first files of each type in each folder are read). Otherwise the command stops with an OutputError (exit
status 2) that names the folder, a few entries that are not ours, and the fix. The same check refuses
an output folder that is a file, that cannot be created or written, or that overlaps a folder the
command reads. Writes themselves refuse to replace a file that is not ours (histotransfer.io.atomic).

A claimed folder is locked (an advisory ``flock`` on the folder itself, released when the command ends
or its process dies): a second command claiming it is refused with the holder's process named, so two
runs never write one folder. Resume never depends on the lock.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from histotransfer.core.config import AGGREGATORS
from histotransfer.core.encoder_ids import ENCODER_ID
from histotransfer.core.errors import OutputError
from histotransfer.io.layout import (
    BUNDLE_SPEC,
    COHORT_META,
    HISTORY_FILE,
    MANIFEST,
    MODEL_FILE,
    SUMMARY,
)
from histotransfer.io.marks import is_ours

OURS_SAMPLE = 32  # files of each type per folder whose content is read (all of them in a whole artifact)


@dataclass(frozen=True)
class Kind:
    """What one kind of folder holds: glob patterns of its files, and its sub-folders (a name pattern,
    or a predicate on the name, with the kind of that sub-folder)."""

    what: str
    files: tuple[str, ...] = ()
    folders: tuple[tuple[str | Callable[[str], bool], Kind], ...] = ()
    whole: bool = False  # the command replaces the folder as a whole: every file is read

    def folder_kind(self, name: str) -> Kind | None:
        for rule, kind in self.folders:
            if rule(name) if callable(rule) else fnmatch.fnmatchcase(name, rule):
                return kind
        return None

    def holds_file(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.files)

    def foreign(self, folder: Path, prefix: str = "") -> list[str]:
        """Entries under ``folder`` (relative names) that this kind never holds or that histotransfer did
        not write."""
        found, read = [], Counter()
        for entry in sorted(folder.iterdir()):
            name = prefix + entry.name
            if entry.name.startswith("."):
                continue  # dotfiles (.gitignore, .DS_Store, our temporaries) are left alone (and carried
                # into a folder replaced whole: histotransfer.io.atomic.atomic_dir)
            if entry.is_dir():
                kind = self.folder_kind(entry.name)
                found += [name + "/"] if kind is None else kind.foreign(entry, name + "/")
            elif not self.holds_file(entry.name):
                found.append(name)
            elif self.whole or read[entry.suffix] < OURS_SAMPLE:
                read[entry.suffix] += 1
                if not is_ours(entry):
                    found.append(name)
        return found


def _encoder_dir(name: str) -> bool:
    return ENCODER_ID.match(name) is not None


def _files(*patterns: str) -> Kind:
    return Kind("", tuple(patterns))


TILES = Kind("tiles", ("*.h5", "*.png", "summary*.csv"))
FEATURES_OF_ENCODER = Kind("", ("*.h5", "summary*.csv"), (("fold*", _files("*.h5", "summary*.csv")),))
_MIL_FILES = ("metrics.json", "predictions.csv", "predictions_by_site.csv", "roc.png")
_MIL_FOLDERS = (
    ("fold*", _files(MODEL_FILE, HISTORY_FILE)),
    ("attention", _files("*.h5")),
    ("heatmaps", _files("*.png")),
)
# mil.compare's other heads: aggregators/{aggregator}/{encoder_id}/, each a MIL result of its own
_COMPARED = Kind(
    "", (), ((AGGREGATORS.__contains__, Kind("", (), ((_encoder_dir, Kind("", _MIL_FILES, _MIL_FOLDERS)),))),)
)
MIL_RESULT = Kind("", _MIL_FILES, (*_MIL_FOLDERS, ("aggregators", _COMPARED)))
FINETUNED = Kind("", (), (("fold*", _files("encoder.pt", "head.pt", "selection.h5", HISTORY_FILE)),))

KINDS: dict[str, Kind] = {
    "cohort": Kind(
        "a sample cohort",
        (MANIFEST, COHORT_META),
        (("slides", _files("*.svs")), ("masks", _files("*.png")), ("artefacts", _files("*.png"))),
    ),
    "tiles": TILES,
    "features": Kind("features (one folder per encoder id)", (), ((_encoder_dir, FEATURES_OF_ENCODER),)),
    "mil": Kind("MIL results (one folder per encoder id)", (), ((_encoder_dir, MIL_RESULT),)),
    "finetune": Kind("fine-tuning results (one folder per encoder id)", (), ((_encoder_dir, FINETUNED),)),
    "cka": Kind("CKA comparisons", ("*__*.json", "*__*.png")),
    "bundle": Kind("an ONNX bundle", (BUNDLE_SPEC, "encoder.onnx", "aggregator.onnx"), whole=True),
    "report": Kind(
        "a study report",
        ("index.html", "summary.md", "lineage.md", "comparisons.json"),
        (("figures", _files("*.png")),),
    ),
    "plots": Kind("DVC plots", ("*.csv", "*.json"), (("roc", _files("*.csv")),)),
    "predictions": Kind(
        "predictions",
        ("predictions.csv", SUMMARY),
        (("slides", _files("*.h5")), ("heatmaps", _files("*.png")), ("tiles", TILES)),
    ),
}


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _resolve(path: Path, what: str) -> Path:
    """``path`` made absolute with its links followed; a link loop (or a name the system refuses) is an
    OutputError naming it."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a symlink loop
        reason = "a symlink loop" if isinstance(exc, RuntimeError) else (exc.strerror or str(exc))
        raise OutputError(
            f"{what} {path} cannot be followed ({reason}): give a real file or folder"
        ) from None


def claim_output(
    folder: str | os.PathLike[str],
    kind: str,
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    fix: str = "give a new or empty folder",
    lock: str | os.PathLike[str] | None = None,
) -> Path:
    """Check that ``folder`` may receive a ``kind`` artifact, create it, prove it writable and lock it
    for this process.

    ``inputs``: folders (or files) the command reads; the output may neither lie inside one nor
    contain one. ``fix``: what to do about files that are not ours in it (for a folder the command
    cannot be told to put elsewhere). ``lock``: the part of the folder the command writes (an encoder's
    folder in features/: commands on other encoders may run beside it); default: all of it. Raises
    OutputError naming the folder and the fix; returns it.
    """
    spec = KINDS[kind]
    folder = Path(folder)
    where = f"the output folder {folder}"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise OutputError(f"{where} {what}, not a folder: give a new or empty folder (the file is kept)")
    resolved = _resolve(folder, "the output folder")
    for given in inputs:
        if given is None:
            continue
        source = _resolve(Path(given), "the input")
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
                f"{where} holds files that are not {spec.what or kind} written by histotransfer ({shown}); "
                f"nothing was changed: {fix}"
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
    if lock is not None:
        Path(lock).mkdir(parents=True, exist_ok=True)
    hold(Path(lock) if lock is not None else folder)
    return folder


# ---------------------------------------------------------------------------------------------- locks


@dataclass
class _Locks:
    held: dict[tuple[int, int], int] = field(default_factory=dict)  # (st_dev, st_ino) -> open fd


_LOCKS = _Locks()


def hold(folder: Path) -> None:
    """Lock ``folder`` for this process (again: a no-op) until ``release_all``; another process
    holding it is an OutputError naming that process."""
    stat = folder.stat()
    key = (stat.st_dev, stat.st_ino)
    if key in _LOCKS.held:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(
            f"the output folder {folder} is being written by another command ({holder(folder)}): wait for "
            "it to finish, or write to another folder"
        ) from None
    except OSError:  # a file system without flock (some network mounts): no lock, as before
        os.close(fd)
        return
    _LOCKS.held[key] = fd


def release_all() -> None:
    """Release every folder this process locked (the end of a command)."""
    for fd in _LOCKS.held.values():
        os.close(fd)
    _LOCKS.held.clear()


def holder(folder: Path) -> str:
    """Which process holds the lock on ``folder``, from /proc/locks (Linux); 'another process' where
    that cannot be told."""
    stat = folder.stat()
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == device and parts[4] != str(os.getpid()):
            pid = parts[4]
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                command = ""
            return f"process {pid}" + (f": {command[:200]}" if command else "")
    return "another process"
