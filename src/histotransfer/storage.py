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

from histotransfer.assets import cache_dir
from histotransfer.atomic import atomic_path

GCS_PREFIX = "gs://"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class StorageError(RuntimeError):
    """An object could not be located, read or verified."""


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
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        return storage.Client()
    except DefaultCredentialsError as exc:
        raise StorageError(
            "no Google Cloud credentials found: run `gcloud auth application-default login`, set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or use workload identity"
        ) from exc


def fetch_gcs(uri: str, *, client=None, cache_root: Path | None = None) -> Path:
    """Local, verified copy of a GCS object, downloaded atomically into the content-addressed cache."""
    from google.api_core import exceptions as gexc
    from google.resumable_media.common import DataCorruption

    parsed = parse_gcs_uri(uri)
    client = client or gcs_client()
    try:
        blob = client.bucket(parsed.bucket).get_blob(parsed.key)
    except gexc.GoogleAPIError as exc:
        raise StorageError(f"cannot read metadata of {uri}: {exc}") from exc
    if blob is None:
        raise StorageError(f"{uri} does not exist (check the bucket and object name)")
    if blob.md5_hash:
        digest, checksum = base64.b64decode(blob.md5_hash).hex(), "md5"
    elif blob.crc32c:
        digest, checksum = f"crc32c-{base64.b64decode(blob.crc32c).hex()}-{blob.size}", "crc32c"
    else:
        raise StorageError(f"{uri} has neither md5 nor crc32c: cannot verify a download")
    out = (cache_root or cache_dir()) / "gcs" / digest / Path(parsed.key).name
    if out.is_file() and out.stat().st_size == blob.size:
        return out
    try:
        with atomic_path(out) as tmp:
            blob.download_to_filename(str(tmp), checksum=checksum)
    except DataCorruption as exc:
        raise StorageError(f"download of {uri} failed verification ({checksum}): {exc}") from exc
    except gexc.GoogleAPIError as exc:
        raise StorageError(f"download of {uri} failed: {exc}") from exc
    return out
