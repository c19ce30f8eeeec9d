"""Attention-MIL: the model, its training, cross-validation folds, evaluation, and the cross-validated
study of one encoder."""
