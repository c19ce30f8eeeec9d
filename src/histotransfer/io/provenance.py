"""What an artifact records about how it was made, and the one resume check every stage uses."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import h5py

from histotransfer import __version__
from histotransfer.core.errors import ArtifactError
from histotransfer.io.atomic import write_text_atomic

CONFIG_HASH_ATTR = "config_hash"
CONFIG_ATTR = "config_json"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace variation, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """Short sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def provenance_attrs(config: dict[str, Any]) -> dict[str, str]:
    """Attributes every h5 artifact carries: package version, the config and its hash."""
    return {
        "histotransfer_version": __version__,
        CONFIG_ATTR: canonical_json(config),
        CONFIG_HASH_ATTR: config_hash(config),
    }


def made_here(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an h5 file that histotransfer wrote (it carries the version attribute)."""
    try:
        with h5py.File(path, "r") as f:
            return "histotransfer_version" in f.attrs
    except (OSError, ValueError):
        return False


def is_current(path: str | os.PathLike[str], expected_hash: str) -> bool:
    """True when ``path`` exists, is readable and was made with the config whose hash is given.

    This is the single definition of "resume may skip this output". An h5 file records the hash in
    its root attributes; a JSON file in a top-level ``config_hash`` key. Unreadable or truncated
    files are not current (they get redone).
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                return f.attrs.get(CONFIG_HASH_ATTR) == expected_hash
        if path.suffix == ".json":  # an edited artifact is not current: it is made again
            data = json.loads(path.read_text(encoding="utf-8"))
            return data.get(CONFIG_HASH_ATTR) == expected_hash and intact(data)
    except (OSError, ValueError, KeyError):
        return False
    raise ValueError(f"no resume rule for artifact type {path.suffix!r}: {path}")


INTEGRITY = "integrity"  # a JSON artifact's sha256 of its own content (see sealed_json)


def integrity(content: dict[str, Any]) -> str:
    """The sha256 of a JSON artifact's content without its ``integrity`` key, as canonical JSON."""
    body = {k: v for k, v in content.items() if k != INTEGRITY}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def sealed_json(data: dict[str, Any]) -> str:
    """The JSON text of an artifact that covers itself: ``integrity`` is the sha256 of everything else
    as a reader parses it, so any edit (a swapped class list, a changed metric) is seen."""
    content = json.loads(json.dumps(data, default=str))
    return json.dumps({**content, INTEGRITY: integrity(content)}, indent=1)


def intact(data: dict[str, Any]) -> bool:
    """Whether a JSON artifact's content is what was sealed (see sealed_json)."""
    return data.get(INTEGRITY) == integrity(data)


DAMAGED = "it is damaged or not histotransfer's: move it away, then "  # + what makes it again


def read_json(path: str | os.PathLike[str], *, redo: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A sealed JSON artifact's top level (an object holding ``keys``); an ArtifactError names the file
    and ``redo`` (what makes it again) when it is missing, unreadable, truncated, not such an object, or
    changed after it was written."""
    path = Path(path)
    damaged = DAMAGED + redo
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: {redo}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON ({str(exc)[:200]}): {damaged}") from None
    if not isinstance(data, dict) or (missing := [k for k in keys if k not in data]):
        what = f"lacks {', '.join(missing)}" if isinstance(data, dict) else f"is a {type(data).__name__}"
        raise ArtifactError(f"{path} {what}, not what histotransfer writes there: {damaged}")
    if INTEGRITY not in data:
        raise ArtifactError(
            f"{path} is not sealed (written by an older histotransfer, or by hand): {damaged}"
        )
    if not intact(data):
        raise ArtifactError(
            f"{path} was changed after histotransfer wrote it (its content does not match its `integrity` "
            f"sha256): {damaged}"
        )
    return data


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256"):
    """The ``hashlib`` digest of a file, read in chunks (never the whole file in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file."""
    return file_digest(path, "sha256").hexdigest()


def recorded_sha256_file(path: str | os.PathLike[str]) -> Path:
    """Where the sha256 a cache recorded for ``path`` when it wrote it lies: ``{path}.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def record_sha256(path: str | os.PathLike[str]) -> None:
    """Record ``path``'s sha256 beside it once ``path`` is complete; ``recorded_sha256`` reads it back."""
    write_text_atomic(recorded_sha256_file(path), sha256_file(path), owned=True)


def recorded_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 recorded for ``path`` by ``record_sha256``; None when none was."""
    record = recorded_sha256_file(path)
    return record.read_text(encoding="utf-8").strip() if record.is_file() else None
