"""CKA (centered kernel alignment): the measures (`linear`, `rbf`, the streaming `MinibatchCKA`, a
small library for notebooks) and the layer-by-layer comparison of two encoders on a study's tiles
(histotransfer.cka.layers)."""

from histotransfer.cka.measures import (
    MinibatchCKA,
    linear,
    median_sigma,
    minibatch_linear,
    rbf,
    unbiased_hsic,
)

__all__ = ["MinibatchCKA", "linear", "median_sigma", "minibatch_linear", "rbf", "unbiased_hsic"]
