"""Patch features: the encoder registry (ARCH[@CUT][+WEIGHTS]), checkpoint loading, extraction,
and bags of features."""
