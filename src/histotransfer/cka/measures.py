"""Centered Kernel Alignment (Kornblith et al. 2019) for comparing representations.

- ``linear(x, y)``: linear CKA of two (n, features) arrays, exact, float64.
- ``rbf(x, y, sigma=None)``: CKA with Gaussian kernels exp(-|a - b|^2 / (2 sigma^2)); when ``sigma`` is
  None each representation gets its own sigma, the median pairwise Euclidean distance between its rows
  (Kornblith et al.'s median heuristic, fraction 1).
- ``MinibatchCKA``: the streaming estimator of Nguyen, Raghu & Kornblith (2021): unbiased HSIC (Song et
  al. 2012) of linear kernels, averaged over minibatches, for a layers x layers matrix. Memory depends
  on the batch size and the feature widths, not on the number of examples.
Inputs are numpy arrays or torch tensors; everything accumulates in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"representations must be (n, features), got shape {x.shape}")
    return x


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"the two representations must cover the same examples: {len(x)} vs {len(y)} rows")
    if len(x) < 2:
        raise ValueError("CKA needs at least 2 examples")


def linear(x, y) -> float:
    """Linear CKA: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on column-centred X, Y."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _center(gram: np.ndarray) -> np.ndarray:
    return gram - gram.mean(axis=0, keepdims=True) - gram.mean(axis=1, keepdims=True) + gram.mean()


def median_sigma(x) -> float:
    """Median Euclidean distance between distinct rows: the RBF bandwidth when none is given."""
    x = _f64(x)
    sq = (x**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    upper = d2[np.triu_indices(len(x), k=1)]
    return float(np.median(np.sqrt(upper)))


def _rbf_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    sq = (x**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    return np.exp(-d2 / (2 * sigma**2))


def rbf(x, y, sigma: float | None = None) -> float:
    """CKA with RBF kernels (full Gram matrices: n x n memory)."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    kx = _center(_rbf_gram(x, sigma or median_sigma(x)))
    ky = _center(_rbf_gram(y, sigma or median_sigma(y)))
    return float((kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky)))


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the paper's names)
    """Song et al.'s unbiased HSIC of two n x n Gram matrices (n > 3)."""
    n = len(k)
    if n < 4:
        raise ValueError("unbiased HSIC needs batches of at least 4 examples")
    k = k.copy()
    l = l.copy()  # noqa: E741
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones_k, ones_l = k.sum(axis=0), l.sum(axis=0)
    term = (k * l).sum() + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2)) - 2 * (ones_k @ ones_l) / (n - 2)
    return float(term / (n * (n - 3)))


class MinibatchCKA:
    """Streaming layers x layers linear CKA over minibatches of the same examples through two networks."""

    def __init__(self, n_a: int, n_b: int):
        self.cross = np.zeros((n_a, n_b))
        self.self_a = np.zeros(n_a)
        self.self_b = np.zeros(n_b)
        self.batches = 0
        self.examples = 0

    def update(self, acts_a: Sequence, acts_b: Sequence) -> None:
        """Add one minibatch: activations (batch, features) of every layer of network a and of b."""
        grams_a = [(a := _f64(x)) @ a.T for x in acts_a]
        grams_b = [(b := _f64(x)) @ b.T for x in acts_b]
        sizes = {len(g) for g in grams_a + grams_b}
        if len(sizes) != 1:
            raise ValueError(
                f"every layer must see the same batch of examples; got batch sizes {sorted(sizes)}"
            )
        for i, ka in enumerate(grams_a):
            self.self_a[i] += unbiased_hsic(ka, ka)
            for j, kb in enumerate(grams_b):
                self.cross[i, j] += unbiased_hsic(ka, kb)
        for j, kb in enumerate(grams_b):
            self.self_b[j] += unbiased_hsic(kb, kb)
        self.batches += 1
        self.examples += sizes.pop()

    def value(self) -> np.ndarray:
        """The (layers_a, layers_b) CKA matrix of everything added so far."""
        if not self.batches:
            raise ValueError("no minibatch added yet")
        return self.cross / np.sqrt(np.outer(self.self_a, self.self_b))


def minibatch_linear(x, y, *, batch_size: int = 256) -> float:
    """Linear CKA of two representations estimated over minibatches (rows in the given order)."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    estimator = MinibatchCKA(1, 1)
    for start in range(0, len(x) - batch_size + 1, batch_size):
        estimator.update([x[start : start + batch_size]], [y[start : start + batch_size]])
    return float(estimator.value()[0, 0])
