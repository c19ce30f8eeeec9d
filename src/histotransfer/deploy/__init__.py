"""The ONNX bundle: export with parity checks, loading, and the torch-free `histotransfer predict`."""
