"""The error types the CLI turns into exit codes, in one torch-free module.

Each is raised by the module named in its docstring and re-exported there; keeping them here lets the
CLI catch them without importing torch, so `histotransfer predict` runs in a torch-free image.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """(config) A config file is unreadable or invalid; the message names the key and the problem."""


class ManifestError(ValueError):
    """(manifest) The manifest is unusable; the message lists every problem with its line number."""


class AssetError(RuntimeError):
    """(assets) A pinned registry asset could not be fetched or failed verification."""


class WeightsError(RuntimeError):
    """(weights) Weights cannot be had or do not fit the network; the message says which and what to do."""


class FeaturesError(ValueError):
    """(bags) Feature files are missing or inconsistent; the message names the file and the fix."""


class SplitError(ValueError):
    """(splits) The cohort cannot be split as asked; the message says why and what to change."""


class TrainingError(RuntimeError):
    """(training) Training diverged or cannot start; the message says where and what to change."""


class ExportError(RuntimeError):
    """(export) A model cannot be exported, or its ONNX export disagrees with torch."""


class BundleError(ValueError):
    """(bundle) An ONNX bundle is missing, corrupt or inconsistent; the message names the file."""


class LayoutError(ValueError):
    """(layout) A stage needs a folder of the study that the command was not given."""


class OutputError(ValueError):
    """(outputs) An output folder cannot be used: a file, not writable, overlapping an input, or
    holding files histotransfer did not write; the message names it and the fix."""


class DeviceError(ValueError):
    """(features.extraction) The requested device does not exist on this machine."""


class GeometryError(ValueError):
    """(wsi.geometry) A slide cannot be tiled at the requested resolution or size."""


class SlideError(RuntimeError):
    """(wsi.slides) A slide cannot be opened, read or used as asked; the message says why and the fix."""


class StorageError(RuntimeError):
    """(storage) An object could not be located, read or verified."""


class ArtifactError(ValueError):
    """(provenance) An artifact file cannot be read as what it should be (truncated, edited, of another
    format); the message names the file and what to redo."""


class LineageError(ValueError):
    """(lineage) An artifact was not made from what it is being used with (another slide, other tiles,
    features or weights); the message names both sides and what to redo."""


class FanOutError(RuntimeError):
    """(stages.fanout) A stage that fans out over encoders failed for every one of them; the message
    gives each one's error."""


class Terminated(KeyboardInterrupt):
    """(lifecycle) SIGTERM (docker stop, Kubernetes), handled as Ctrl-C is."""

    signal = "SIGTERM"


class Interrupted(KeyboardInterrupt):
    """(runner) Ctrl-C or SIGTERM during a per-slide stage: carries what finished (its summary is
    written) and which signal ended it."""

    def __init__(self, stage: str, result, remaining: int, signal: str = "SIGINT"):
        super().__init__(stage)
        self.stage = stage
        self.result = result  # a runner.StageResult of the slides that finished or failed
        self.remaining = remaining
        self.signal = signal


# What a user can cause and fix (each message names the file, row, key or folder, and the fix): the
# CLI turns these into exit status 2.
USER_ERRORS = (
    ArtifactError,
    AssetError,
    BundleError,
    ConfigError,
    DeviceError,
    ExportError,
    FeaturesError,
    GeometryError,
    LayoutError,
    LineageError,
    ManifestError,
    OutputError,
    SlideError,
    SplitError,
    StorageError,
    TrainingError,
    WeightsError,
)
