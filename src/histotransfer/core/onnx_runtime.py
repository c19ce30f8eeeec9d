"""ONNX Runtime, shared by CPU extraction (features) and the bundle (deploy). Torch-free.

Opening a session, checking that a file has the inputs and outputs it should, running the encoder, and
measuring parity of ONNX Runtime's outputs against torch's; the encoder graph's tensor names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from histotransfer.core.errors import BundleError, ExportError

log = logging.getLogger(__name__)
ENCODER_INPUT, ENCODER_OUTPUT = "tiles", "features"  # uint8 (n, 3, p, p) -> float32 (n, dim)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # on max |ort - torch| / max |torch|


class Parity(BaseModel):
    """Torch vs ONNX Runtime on the same inputs: max |a - b| and that over max |torch|."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_abs: float
    max_rel: float
    tolerance: float  # on max_rel
    inputs: str


def session(path: Path, *, threads: int | None = None, providers: list[str] | None = None, spin: bool = True):
    """An ONNX Runtime session: CUDA when the installed runtime offers it (onnxruntime-gpu), else CPU.
    ``spin=False``: its threads sleep between operators instead of spinning, for when tile readers
    share the cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


def check_io(name: Path, sess, inputs: dict[str, tuple[str, list]], outputs: dict[str, list]) -> None:
    """Input/output names, element types and fixed dimensions are the ones the bundle promises."""
    got_in = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    got_out = {o.name: o.shape for o in sess.get_outputs()}
    if set(got_in) != set(inputs) or set(got_out) != set(outputs):
        raise BundleError(
            f"{name}: has inputs {sorted(got_in)} and outputs {sorted(got_out)}; expected "
            f"{sorted(inputs)} and {sorted(outputs)}: not a file of this bundle format"
        )

    def fixed(shape: list) -> list:
        return [d if isinstance(d, int) else None for d in shape]

    for key, (dtype, shape) in inputs.items():
        if got_in[key][0] != dtype or fixed(got_in[key][1]) != shape:
            raise BundleError(
                f"{name}: input `{key}` is {got_in[key][0]} {got_in[key][1]}, bundle.json implies "
                f"{dtype} {shape}: the files do not belong together; export again"
            )
    for key, shape in outputs.items():
        if fixed(got_out[key]) != shape:
            raise BundleError(
                f"{name}: output `{key}` has shape {got_out[key]}, bundle.json implies {shape}: "
                "the files do not belong together; export again"
            )


def run_session(sess, tiles: np.ndarray) -> np.ndarray:
    """Features (n, dim) float32 of uint8 tiles (n, 3, h, w)."""
    return sess.run(None, {sess.get_inputs()[0].name: tiles})[0]


def measure_parity(
    expected: Sequence[np.ndarray], got: Sequence[np.ndarray], *, tolerance: float, inputs: str
) -> Parity:
    """Parity of two lists of outputs; max_rel is max |got - expected| over max |expected|."""
    max_abs = max(float(np.abs(g - e).max()) for e, g in zip(expected, got, strict=True))
    scale = max(float(np.abs(e).max()) for e in expected)
    return Parity(max_abs=max_abs, max_rel=max_abs / (scale + 1e-12), tolerance=tolerance, inputs=inputs)


def check_parity(parity: Parity, what: str, path: Path) -> None:
    """ExportError when ``parity`` exceeds its tolerance; else a log line."""
    if not parity.max_rel <= parity.tolerance:  # also catches NaN
        raise ExportError(
            f"ONNX export of {what} disagrees with torch: relative error {parity.max_rel:.2e} > "
            f"{parity.tolerance:g} on {parity.inputs} ({path})"
        )
    log.info(
        "%s: ONNX parity %.2e (tolerance %g) on %s", what, parity.max_rel, parity.tolerance, parity.inputs
    )
