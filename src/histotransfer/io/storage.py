"""Local paths and ``gs://`` URIs: parsing, and a verified, content-addressed local cache for GCS.

OpenSlide needs a local file, so a slide on Google Cloud Storage is downloaded once into
``<cache>/gcs/<md5>/<name>`` (the object's checksum names the folder, so a changed object gets a new
entry and an unchanged one is never fetched twice). Honours ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from histotransfer.core.errors import StorageError
from histotransfer.io.assets import cache_dir
from histotransfer.io.atomic import atomic_path
from histotransfer.io.provenance import file_digest

GCS_PREFIX = "gs://"
LOGIN = "log in again (`gcloud auth application-default login`) or check GOOGLE_APPLICATION_CREDENTIALS"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


@dataclass(frozen=True)
class GcsUri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{GCS_PREFIX}{self.bucket}/{self.key}"


def is_gcs_uri(path: str | Path) -> bool:
    return str(path).startswith(GCS_PREFIX)


def parse_gcs_uri(uri: str) -> GcsUri:
    """Split ``gs://bucket/key`` into its parts, rejecting malformed URIs."""
    if not is_gcs_uri(uri):
        raise StorageError(f"not a gs:// URI: {uri!r}")
    bucket, _, key = uri[len(GCS_PREFIX) :].partition("/")
    if not _BUCKET_RE.match(bucket) or not key or key.endswith("/"):
        raise StorageError(f"malformed GCS URI {uri!r}: expected gs://BUCKET/OBJECT")
    return GcsUri(bucket, key)


def gcs_client():
    """A google-cloud-storage client using application default credentials (or the emulator)."""
    from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
    from google.cloud import storage

    try:
        return storage.Client()
    except DefaultCredentialsError as exc:
        raise StorageError(
            "no Google Cloud credentials found: run `gcloud auth application-default login`, set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or use workload identity"
        ) from exc
    except GoogleAuthError as exc:
        raise StorageError(f"Google Cloud credentials cannot be used ({exc}): {LOGIN}") from exc


def _object(uri: str, client=None):
    """(blob, content digest, checksum kind) of a GCS object, from its metadata (one request)."""
    parsed = parse_gcs_uri(uri)
    client = client or gcs_client()
    try:
        blob = client.bucket(parsed.bucket).get_blob(parsed.key)
    except _failures() as exc:
        raise StorageError(f"cannot read metadata of {uri}: {exc}") from exc
    if blob is None:
        raise StorageError(f"{uri} does not exist (check the bucket and object name)")
    if blob.md5_hash:
        return blob, base64.b64decode(blob.md5_hash).hex(), "md5"
    if blob.crc32c:
        return blob, f"crc32c-{base64.b64decode(blob.crc32c).hex()}-{blob.size}", "crc32c"
    raise StorageError(f"{uri} has neither md5 nor crc32c: cannot verify a download")


def object_identity(uri: str, *, client=None) -> str:
    """What a GCS object's content is (its md5, else crc32c and size), from its metadata: the identity
    of a slide on gs:// without downloading it."""
    return _object(uri, client)[1]


def fetch_gcs(uri: str, *, client=None, cache_root: Path | None = None) -> Path:
    """Local, verified copy of a GCS object, downloaded atomically into the content-addressed cache."""
    from google.resumable_media.common import DataCorruption

    parsed = parse_gcs_uri(uri)
    blob, digest, checksum = _object(uri, client)
    out = (cache_root or cache_dir()) / "gcs" / digest / Path(parsed.key).name
    if out.is_file() and out.stat().st_size == blob.size:
        return out
    try:
        with atomic_path(out, owned=True) as tmp:
            blob.download_to_filename(str(tmp), checksum=checksum)
    except DataCorruption as exc:
        raise StorageError(f"download of {uri} failed verification ({checksum}): {exc}") from exc
    except _failures() as exc:
        raise StorageError(f"download of {uri} failed: {exc}") from exc
    return out


# ---------------------------------------------------------------------------------------- outputs on GCS

COMPLETE_MARKER = "_HISTOTRANSFER_COMPLETE.json"  # written last: an output tree without it is unfinished
WRITING_MARKER = "_HISTOTRANSFER_WRITING.json"  # an upload under way: what it writes (ours, if it stops)


def parse_gcs_prefix(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/folder`` -> (bucket, ``some/folder``); the folder may be empty."""
    if not is_gcs_uri(uri):
        raise StorageError(f"not a gs:// URI: {uri!r}")
    bucket, _, prefix = uri[len(GCS_PREFIX) :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(f"malformed GCS URI {uri!r}: expected gs://BUCKET[/FOLDER]")
    return bucket, prefix.strip("/")


def staging_dir(uri: str) -> Path:
    """The local folder a command writes a gs:// output root into before uploading it; stable per URI,
    so a rerun resumes from what is already there."""
    import hashlib

    bucket, prefix = parse_gcs_prefix(uri)
    digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16]
    return cache_dir() / "gcs-outputs" / digest


def _retry():
    """Retries with exponential backoff for transient errors (also for uploads, which google-cloud-
    storage retries by default only when conditional); the deadline is HISTOTRANSFER_GCS_RETRY_S."""
    import os

    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(float(os.environ.get("HISTOTRANSFER_GCS_RETRY_S", "120")))


def _failures() -> tuple[type[BaseException], ...]:
    """What a request to GCS raises when it fails: the API's errors, the transport's, and credentials
    that cannot be refreshed (an expired login)."""
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import GoogleAuthError
    from requests import exceptions as rexc

    return (gexc.GoogleAPIError, GoogleAuthError, rexc.RequestException, ConnectionError)


@dataclass(frozen=True)
class RemoteTree:
    """What an output folder on gs:// holds: its objects (relative name -> md5) and which of them
    histotransfer wrote (listed by its completion marker, or by the marker of an upload under way)."""

    objects: dict[str, str]
    ours: frozenset[str]

    @property
    def foreign(self) -> list[str]:
        return sorted(set(self.objects) - self.ours - {COMPLETE_MARKER, WRITING_MARKER})


def remote_tree(bucket, prefix: str, *, client, retry) -> RemoteTree:
    import json

    def key(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    start = len(prefix) + 1 if prefix else 0
    blobs = {
        b.name[start:]: b.md5_hash for b in client.list_blobs(bucket.name, prefix=prefix or None, retry=retry)
    }
    ours: set[str] = set()
    for marker in (COMPLETE_MARKER, WRITING_MARKER):
        if marker in blobs:
            try:
                listed = json.loads(bucket.blob(key(marker)).download_as_bytes(retry=retry)).get("files", {})
                ours |= set(listed) if isinstance(listed, dict | list) else set()
            except (ValueError, AttributeError):
                pass  # a marker that is not ours lists nothing
    return RemoteTree(blobs, frozenset(ours))


def _refuse_foreign(uri: str, foreign: list[str]) -> None:
    """A StorageError naming the objects under ``uri`` that histotransfer did not write, if any."""
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise StorageError(
            f"the output {uri} holds objects histotransfer did not write ({shown}); nothing was changed: "
            "give a new or empty gs:// folder"
        )


def check_destination(uri: str, *, client=None) -> None:
    """An output root on gs:// can be used, before any work: credentials exist, the bucket answers, and
    every object already under it was written by histotransfer (its markers list them); a StorageError
    names the URI and the fix."""
    bucket_name, prefix = parse_gcs_prefix(uri)
    client = client or gcs_client()
    try:
        tree = remote_tree(client.bucket(bucket_name), prefix, client=client, retry=_retry())
    except _failures() as exc:
        raise StorageError(
            f"the output {uri} cannot be reached ({type(exc).__name__}: {str(exc)[:300]}): check the bucket "
            f"name and your access to it, or {LOGIN} (nothing was run)"
        ) from exc
    _refuse_foreign(uri, tree.foreign)


def upload_tree(local: str | Path, uri: str, *, client=None) -> dict[str, int]:
    """Upload every file under ``local`` to ``uri`` (a gs:// folder), then the completion marker.

    Objects under ``uri`` that histotransfer did not write are never replaced (StorageError). Before the
    first changed object, a marker of the upload under way is written (listing what is being written:
    an interrupted upload's objects stay recognisably ours) and the completion marker is deleted, so a
    reader never sees a completion marker over a tree that is half old, half new.

    Each object is written by one request, so it appears only complete (never half-written); objects
    that already hold the same bytes (md5) are skipped, so a rerun after a failure resumes. Transient
    errors are retried with backoff; a failure that outlasts the retries is a StorageError naming the
    object, and the completion marker is not written.
    """
    import json

    local = Path(local)
    bucket_name, prefix = parse_gcs_prefix(uri)
    client = client or gcs_client()
    bucket = client.bucket(bucket_name)

    def key(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    def put(name: str, content: dict) -> None:
        text = json.dumps(content, indent=1)
        bucket.blob(key(name)).upload_from_string(text, content_type="application/json", retry=retry)

    retry = _retry()
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
    uploaded = skipped = 0
    listing = {}
    try:
        tree = remote_tree(bucket, prefix, client=client, retry=retry)
        changed = []
        for path in files:
            rel = path.relative_to(local).as_posix()
            md5 = base64.b64encode(file_digest(path, "md5").digest()).decode()  # GCS's md5_hash form
            listing[rel] = md5
            if tree.objects.get(rel) == md5:
                skipped += 1
            else:
                changed.append((path, rel))
        if replaced := [rel for _, rel in changed if rel in tree.objects and rel not in tree.ours]:
            _refuse_foreign(uri, replaced)
        if changed:  # the tree is about to change: not complete until the new marker is written
            put(WRITING_MARKER, {"files": sorted(tree.ours | set(listing))})
            if COMPLETE_MARKER in tree.objects:
                bucket.blob(key(COMPLETE_MARKER)).delete(retry=retry)
        for path, rel in changed:
            bucket.blob(key(rel)).upload_from_filename(str(path), checksum="md5", retry=retry)
            uploaded += 1
        put(COMPLETE_MARKER, {"files": listing, "count": len(listing)})
        if changed or WRITING_MARKER in tree.objects:
            bucket.blob(key(WRITING_MARKER)).delete(retry=retry)
    except _failures() as exc:
        raise StorageError(
            f"upload to {uri} failed after retries ({type(exc).__name__}: {exc}); {uploaded} object(s) "
            f"uploaded, none half-written, no {COMPLETE_MARKER} written: rerun to resume"
        ) from exc
    return {"uploaded": uploaded, "skipped": skipped}


def is_complete(uri: str, *, client=None) -> bool:
    """True when a gs:// output folder carries the completion marker."""
    bucket_name, prefix = parse_gcs_prefix(uri)
    client = client or gcs_client()
    name = f"{prefix}/{COMPLETE_MARKER}" if prefix else COMPLETE_MARKER
    return client.bucket(bucket_name).get_blob(name) is not None
