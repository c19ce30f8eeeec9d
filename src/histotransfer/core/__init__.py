"""The ground floor: the config schema, the encoder-id grammar and catalogue, the error types, the
per-slide runner, how a command starts and ends, CPU counting, logging, and ONNX Runtime sessions.
Torch-free; every other part of the package builds on it."""
