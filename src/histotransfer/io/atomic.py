"""Atomic file writes: an artifact appears under its final name only once it is complete, and never
over a file that histotransfer did not write.

Temporary names are ``.{final name}.{host}-{pid}-{token}.partial`` (host: the host name and PID
namespace): neither a glob over finished artifacts nor a reader sees them, and the leftovers of a killed
writer are removed by the next write of the same artifact, but only when that writer is known to be gone
(same host and namespace, no such process): a live process's temporary file is never removed by another.
A folder's swap (atomic_dir) is not interrupted by Ctrl-C or SIGTERM half way.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from histotransfer.core.errors import OutputError


def _host() -> str:
    """This machine and process namespace: the host name and the PID namespace (containers sharing a
    host's name and network have their own process ids), as one name token."""
    try:
        namespace = f"-ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return (re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:48] or "host") + namespace


HOST = _host()
PARTIAL = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}(\.old)?\.partial$")


def temporary_name(final: Path, suffix: str = "") -> Path:
    """A fresh temporary name beside ``final`` that says which process writes it."""
    return final.with_name(f".{final.name}.{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(partial: Path) -> bool:
    """A temporary file or folder whose writer is gone: made on this host by a process that no longer
    exists (a temporary of another host, or of a live process, is never stale)."""
    match = PARTIAL.match(partial.name)
    if match is None:
        return False
    return match["host"] == HOST and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))


def _remove_stale(final: Path) -> None:
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        if is_stale(stale):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _kept(relative: Path) -> bool:
    """A folder's own dotfile (``.gitignore``, ``.notes``): kept when the folder is replaced whole."""
    return len(relative.parts) == 1 and relative.name.startswith(".") and PARTIAL.match(relative.name) is None


def refuse_foreign(final: Path) -> None:
    """Raise OutputError when ``final`` exists and is not a file histotransfer wrote (by its content)."""
    if not (final.exists() or final.is_symlink()):
        return
    from histotransfer.io.marks import is_ours

    if final.is_dir():  # its own dotfiles are carried over by atomic_dir; any other file must be ours
        foreign = [
            p for p in final.rglob("*") if p.is_file() and not _kept(p.relative_to(final)) and not is_ours(p)
        ]
        if not foreign:
            return
        names = ", ".join(str(p.relative_to(final)) for p in foreign[:3])
        what = f"holds files histotransfer did not write ({names})"
    elif is_ours(final) and not final.is_symlink():
        return
    else:
        what = "exists and is not a file histotransfer wrote"
    raise OutputError(f"{final} {what}: nothing was replaced; move it away or write to another folder")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], *, owned: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` when the block succeeds.

    On any exception the temporary file is removed and ``final`` is left exactly as it was. A ``final``
    that exists and was not written by histotransfer is refused (OutputError) before anything is
    written; ``owned``: the caller owns the path whatever is there (a cache entry it verifies).
    Writers that pick a format from the extension must be told the format explicitly.
    """
    final = Path(final)
    if not owned:
        refuse_foreign(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = temporary_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: str | os.PathLike[str], text: str, *, owned: bool = False) -> Path:
    """Write ``text`` to ``final`` atomically and return the final path."""
    with atomic_path(final, owned=owned) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(final)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; swap it in for ``final`` when the block succeeds.

    Readers see the old folder or the complete new one, never a mix: the old one is renamed aside,
    the staged one renamed into place, then the old one deleted. On an exception the staging folder is
    removed and ``final`` is untouched. A ``final`` holding files histotransfer did not write is refused.
    """
    final = Path(final)
    refuse_foreign(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    staging = temporary_name(final)
    staging.mkdir()
    try:
        yield staging
        old = temporary_name(final, ".old")
        with _signals_held():  # the old folder aside and the new one in place, or neither
            if final.exists():
                for kept in (p for p in final.iterdir() if _kept(p.relative_to(final))):
                    if not (staging / kept.name).exists():  # the user's dotfiles stay with the folder
                        os.replace(kept, staging / kept.name)
                os.replace(final, old)
            os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then take effect as they would have (in the main
    thread; elsewhere they do not arrive).

    The Python handlers are swapped for a recorder rather than the signals blocked: a signal sent to
    the process goes to any thread that does not block it (torch's and ONNX Runtime's workers), and its
    handler then runs in the main thread all the same, so only the handler can hold it back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: installed outside Python; the default is closest
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])  # delivered now, to the handler it was meant for
