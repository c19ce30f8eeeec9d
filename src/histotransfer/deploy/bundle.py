"""The ONNX bundle: what `histotransfer export` writes and `histotransfer predict` runs. Torch-free.

``onnx/{name}/``
  ``encoder.onnx``     uint8 tiles ``tiles`` (n, 3, p, p) -> ``features`` (n, dim); normalisation inside
  ``aggregator.onnx``  ``features`` (n, dim) float32 -> ``probabilities`` (n_classes,), ``attention`` (n,)
  ``bundle.json``      how the tiles are made, the classes, provenance and lineage, the files' sha256,
                       the parity error measured against torch at export (written last), and
                       ``integrity``: the sha256 of its own content (canonical JSON, without this key),
                       so that an edited bundle.json (swapped classes, another tiling) is refused
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from histotransfer.core.config import TilingConfig
from histotransfer.core.errors import BundleError
from histotransfer.core.onnx_runtime import ENCODER_INPUT, ENCODER_OUTPUT, Parity, check_io, session
from histotransfer.io.layout import BUNDLE_SPEC
from histotransfer.io.provenance import intact, sealed_json, sha256_file

BUNDLE_FORMAT = "histotransfer-onnx-bundle"
BUNDLE_VERSION = 3  # 2: integrity and lineage; 3: aggregator.kind (was attention: paper | gated)
ENCODER_FILE, AGGREGATOR_FILE, BUNDLE_FILE = "encoder.onnx", "aggregator.onnx", BUNDLE_SPEC
AGGREGATOR_INPUT, AGGREGATOR_OUTPUTS = "features", ("probabilities", "attention")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderInfo(_Strict):
    id: str
    dim: int = Field(ge=1)
    weights_source: str
    weights_sha256: str
    mean: tuple[float, float, float]  # applied inside encoder.onnx, recorded for other readers
    std: tuple[float, float, float]
    precision: Literal["fp32", "fp16"]


class AggregatorInfo(_Strict):
    mil_dir: str  # the MIL result the head came from
    fold: int
    val_loss: float | None  # of the kept epoch; None when the folds had no validation slides
    train_loss: float | None = None  # of the kept epoch (older bundles lack it)
    kind: Literal["abmil", "gated", "clam_sb", "transmil", "mean", "max"]  # the head (mil.aggregator)


class BundleSpec(_Strict):
    format: Literal["histotransfer-onnx-bundle"] = BUNDLE_FORMAT
    format_version: int
    name: str
    histotransfer_version: str
    created: str
    opset: int
    classes: list[str] = Field(min_length=2)
    tiling: TilingConfig
    encoder: EncoderInfo
    aggregator: AggregatorInfo
    parity: dict[str, Parity]  # "encoder", "aggregator"
    files: dict[str, str]  # file name -> sha256
    source_hash: str  # of the weights, head, tiling and settings it was made from (export's resume check)
    lineage: dict[str, Any]  # the MIL result, fold head, weights and tiling (histotransfer.io.lineage)
    integrity: str  # sha256 of the canonical JSON of every other key (see integrity())


def spec_json(spec: BundleSpec) -> str:
    """bundle.json's text for ``spec``, sealed (provenance.sealed_json: its ``integrity``)."""
    return sealed_json(json.loads(spec.model_dump_json(exclude={"integrity"})))


@dataclass
class Bundle:
    """A loaded, verified bundle with its two ONNX Runtime sessions."""

    path: Path
    spec: BundleSpec
    encoder: Any  # onnxruntime.InferenceSession
    aggregator: Any

    @property
    def providers(self) -> list[str]:
        return list(self.encoder.get_providers())


def read_spec(path: str | Path) -> BundleSpec:
    """``bundle.json`` of the bundle folder ``path``, validated; BundleError names the file and key."""
    folder = Path(path)
    file = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise BundleError(f"no bundle folder {folder}: export one with `histotransfer export`")
    if not file.is_file():
        if inside := sorted(p.parent for p in folder.glob(f"onnx/*/{BUNDLE_FILE}")):  # a study's folder
            raise BundleError(
                f"{folder} is a study, not a bundle: give --bundle its bundle folder "
                f"({', '.join(str(p) for p in inside[:3])})"
            )
        raise BundleError(
            f"{file} is missing: {folder} is not a finished bundle (an export that stopped early "
            "never writes it); export again"
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file} is not readable JSON ({exc}); export the bundle again") from exc
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{file} is not a histotransfer bundle (key `format` is not {BUNDLE_FORMAT!r})")
    if raw.get("format_version") != BUNDLE_VERSION:
        raise BundleError(
            f"{file} has format_version {raw.get('format_version')!r}; this histotransfer reads version "
            f"{BUNDLE_VERSION}: export the bundle again with this version"
        )
    if not intact(raw):
        raise BundleError(
            f"{file} was changed after export (its content does not match its `integrity` sha256): a "
            "bundle is used whole or not at all; export it again (nothing was run)"
        )
    try:
        return BundleSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"`{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise BundleError(f"{file}: {problems}") from exc


def verify_files(folder: Path, spec: BundleSpec) -> None:
    """Both ONNX files exist and hash to what bundle.json recorded (no torn or swapped files)."""
    for name in (ENCODER_FILE, AGGREGATOR_FILE):
        file = folder / name
        expected = spec.files.get(name)
        if expected is None:
            raise BundleError(f"{folder / BUNDLE_FILE}: `files` has no sha256 for {name}")
        if not file.is_file():
            raise BundleError(f"{file} is missing from the bundle; export it again")
        if (actual := sha256_file(file)) != expected:
            raise BundleError(
                f"{file} does not match {BUNDLE_FILE} (sha256 {actual[:12]}..., recorded "
                f"{expected[:12]}...): the file is corrupt or comes from another export; export again"
            )


def load_bundle(
    path: str | Path, *, threads: int | None = None, providers: list[str] | None = None
) -> Bundle:
    """Read, verify and open a bundle; every inconsistency is a BundleError naming the file."""
    folder = Path(path)
    spec = read_spec(folder)
    verify_files(folder, spec)
    sessions = {}
    for name in (ENCODER_FILE, AGGREGATOR_FILE):
        try:
            sessions[name] = session(folder / name, threads=threads, providers=providers)
        except Exception as exc:  # onnxruntime raises its own, unexported error types
            raise BundleError(f"{folder / name}: ONNX Runtime cannot load it ({exc})") from exc
    p, dim = spec.tiling.patch_size_px, spec.encoder.dim
    check_io(
        folder / ENCODER_FILE,
        sessions[ENCODER_FILE],
        {ENCODER_INPUT: ("tensor(uint8)", [None, 3, p, p])},
        {ENCODER_OUTPUT: [None, dim]},
    )
    check_io(
        folder / AGGREGATOR_FILE,
        sessions[AGGREGATOR_FILE],
        {AGGREGATOR_INPUT: ("tensor(float)", [None, dim])},
        {"probabilities": [len(spec.classes)], "attention": [None]},
    )
    return Bundle(folder, spec, sessions[ENCODER_FILE], sessions[AGGREGATOR_FILE])


def describe(spec: BundleSpec) -> dict[str, Any]:
    """The facts a report or a log line shows about a bundle."""
    return {
        "name": spec.name,
        "encoder": spec.encoder.id,
        "precision": spec.encoder.precision,
        "fold": spec.aggregator.fold,
        "classes": spec.classes,
        "tiles": f"{spec.tiling.patch_size_px} px at {spec.tiling.target_mpp:g} um/px",
        "parity": {k: v.max_rel for k, v in spec.parity.items()},
    }
