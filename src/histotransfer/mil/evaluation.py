"""Slide-level metrics with bootstrap confidence intervals, and attention localisation scores."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def point_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and F1, with scikit-learn.

    ``probs`` is (n_slides, n_classes). Binary: AUC and F1 of the second class. More classes: AUC is the
    mean one-vs-rest AUC over the classes present (and not alone), F1 the macro F1. AUC is NaN when only
    one class is present.
    """
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class resamples: sklearn warns, the values stay defined
        if len(present) < 2:
            auc = float("nan")
        elif n_classes == 2:
            auc = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            auc = float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))
        return {
            "auc": auc,
            "accuracy": float(accuracy_score(y_true, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
            "f1": float(
                f1_score(y_true, pred, average="binary", zero_division=0)
                if n_classes == 2
                else f1_score(y_true, pred, average="macro", labels=list(range(n_classes)), zero_division=0)
            ),
        }


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (what roc_auc_score computes)."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The same numbers as ``point_metrics``, in plain numpy: fast enough for a thousand resamples."""
    n, k = probs.shape
    pred = probs.argmax(axis=1)
    cm = np.bincount(y_true * k + pred, minlength=k * k).reshape(k, k)  # rows: truth, columns: prediction
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    present = np.flatnonzero(support)
    if len(present) < 2:
        auc = float("nan")
    elif k == 2:
        auc = _binary_auc(y_true == 1, probs[:, 1])
    else:
        auc = float(np.mean([_binary_auc(y_true == c, probs[:, c]) for c in present]))
    return {
        "auc": auc,
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall[present].mean()),
        "f1": float(f1[1] if k == 2 else f1.mean()),
    }


def with_confidence(
    y_true: np.ndarray, probs: np.ndarray, *, n_boot: int, ci: float, seed: int
) -> dict[str, Any]:
    """Each metric's value and its percentile bootstrap CI (slides resampled with replacement)."""
    values = point_metrics(y_true, probs)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    n = len(y_true)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for name, value in fast_metrics(y_true[idx], probs[idx]).items():
            if not np.isnan(value):
                samples[name].append(value)
    alpha = (1 - ci) / 2
    out = {}
    for name in METRICS:
        s = np.array(samples[name])
        enough = len(s) >= n_boot // 2  # too few defined resamples (tiny, one-class sets): no CI
        out[name] = {
            "value": None if np.isnan(values[name]) else values[name],
            "ci_low": float(np.quantile(s, alpha)) if enough else None,
            "ci_high": float(np.quantile(s, 1 - alpha)) if enough else None,
        }
    return out


def fold_summary(per_fold: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and standard deviation of each metric over folds (folds where it is undefined skipped)."""
    out = {}
    for name in METRICS:
        vals = [f[name]["value"] for f in per_fold if f[name]["value"] is not None]
        out[name] = {
            "mean": float(np.mean(vals)) if vals else None,
            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
        }
    return out


def localisation_auroc(attention: np.ndarray, lesion: np.ndarray) -> float | None:
    """AUROC of tile attention against tile lesion labels; None when the slide lacks either class."""
    if lesion.all() or not lesion.any():
        return None
    return float(roc_auc_score(lesion.astype(int), attention))


def seed_summary(rows: Sequence[tuple[int, dict[str, float], float | None]]) -> dict[str, Any]:
    """Repeated cross-validation: each seed's pooled point metrics and localisation, with the mean and
    the standard deviation over seeds (None where undefined or, for sd, with a single seed)."""
    per_seed = [
        {"seed": seed, **{k: _defined(v) for k, v in metrics.items()}, "localisation": loc}
        for seed, metrics, loc in rows
    ]
    summary: dict[str, Any] = {"n": len(rows), "per_seed": per_seed, "mean": {}, "sd": {}}
    for name in (*METRICS, "localisation"):
        vals = [row[name] for row in per_seed if row[name] is not None]
        summary["mean"][name] = float(np.mean(vals)) if vals else None
        summary["sd"][name] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return summary


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
