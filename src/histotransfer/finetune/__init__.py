"""Attention top-k fine-tuning of an encoder inside each cross-validation fold."""
