"""Logging as every entry point sets it up (the CLI, the pipeline components)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY = ("onnx_ir", "onnxscript", "torch.onnx")  # the ONNX exporter logs every optimisation pass at INFO


def configure_logging(verbose: bool = False) -> None:
    """INFO (DEBUG when ``verbose``) to stderr; the exporter's pass-by-pass logging only when verbose."""
    # force: the handler writes to today's sys.stderr even when the process ran a command before
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, force=True)
    if not verbose:
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
