"""histotransfer: transfer learning for histopathology (Sharma et al., arXiv 2106.07068) as a pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histotransfer")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
