"""The container images, named here only (the Makefile asks this module): every component runs in the
`gpu` target of containers/Dockerfile (it also runs on CPU nodes); `cpu` and `predict` are the slimmer
ones. The tag is the package's version; the registry is HISTOTRANSFER_REGISTRY (default below), read
when pipelines are compiled and images built.

    python -m components.image gpu     # prints the image reference, as `make image-gpu` uses it
"""

import os
import sys
import tomllib
from pathlib import Path


def _version() -> str:
    """The installed package's version; in a source tree whose package is not installed (`make test`
    names the images while .venv is still being made), pyproject.toml's, which it is installed from."""
    try:
        from histotransfer import __version__
    except ImportError:
        with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as f:
            return tomllib.load(f)["project"]["version"]
    return __version__


REGISTRY = os.environ.get("HISTOTRANSFER_REGISTRY", "ghcr.io/histotransfer")
VERSION = _version()
TARGETS = {"cpu": "", "gpu": "-gpu", "predict": "-predict"}


def image(target: str = "gpu") -> str:
    """The reference of containers/Dockerfile's ``target`` image."""
    return f"{REGISTRY}/histotransfer:{VERSION}{TARGETS[target]}"


IMAGE = image("gpu")

if __name__ == "__main__":
    print(image(sys.argv[1] if len(sys.argv) > 1 else "gpu"))
