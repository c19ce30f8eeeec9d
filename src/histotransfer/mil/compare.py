"""Paired comparison of encoders on the same slides: is encoder A's AUC really higher than B's?

Each encoder's own bootstrap interval answers "how sure are we of this AUC", not "does A beat B": on the
same slides the two AUCs are correlated, and overlapping intervals say nothing about their difference.
Here every encoder is compared with the best one on the out-of-fold predictions of the slides both
classified:

- the AUC difference with a paired bootstrap CI: the same resampled units for both encoders, and the
  units are patients where the manifest gives them (slides of one patient are not independent);
- DeLong's test for two correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988), in the midrank form of
  Sun & Xu (2014), for binary studies whose units are slides. DeLong counts cases as independent, so a
  cohort with several slides per patient, and a multi-class study (macro one-vs-rest AUC), get the
  paired bootstrap's two-sided p-value instead, and say so (``test``);
- p-values adjusted for the number of comparisons (Holm 1979).

Torch-free: the report reads finished MIL results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

from histotransfer.mil.evaluation import fast_metrics


@dataclass(frozen=True)
class DeLong:
    auc_a: float
    auc_b: float
    se: float  # of auc_a - auc_b
    z: float
    p: float  # two-sided


def delong(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> DeLong:
    """DeLong's test of AUC(a) = AUC(b) for two scores of the same binary cases (``y`` in {0, 1})."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 cases of each class, got {m} and {n}")
    scores = np.stack([np.asarray(score_a, float), np.asarray(score_b, float)])
    pos, neg = scores[:, y], scores[:, ~y]
    v10, v01, auc = np.empty((2, m)), np.empty((2, n)), np.empty(2)
    for r in range(2):
        tx, ty = rankdata(pos[r]), rankdata(neg[r])
        tz = rankdata(np.concatenate([pos[r], neg[r]]))
        auc[r] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[r] = (tz[:m] - tx) / n  # per positive: the share of negatives it outranks (ties count half)
        v01[r] = 1 - (tz[m:] - ty) / m  # per negative: the share of positives that outrank it
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    if var <= 1e-15:  # the same ranking twice (or both perfect): no difference, or none it can measure
        return DeLong(float(auc[0]), float(auc[1]), 0.0, 0.0, 1.0 if abs(diff) < 1e-12 else float("nan"))
    se = var**0.5
    return DeLong(float(auc[0]), float(auc[1]), se, diff / se, float(2 * norm.sf(abs(diff) / se)))


def paired_bootstrap(
    y: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    *,
    units: Sequence[str] | None = None,
    n_boot: int,
    ci: float,
    seed: int,
) -> tuple[float | None, float | None, float | None]:
    """(low, high, two-sided p) of AUC(a) - AUC(b) by resampling ``units`` (patient ids, one per case;
    None: the cases) with replacement, the same draw for both. ``probs_*`` are (n, classes); the AUC is
    ``evaluation.fast_metrics``'s (binary: the second class; more: macro one-vs-rest over the classes
    present). None when fewer than half the resamples hold two classes, or with fewer than 2 cases."""
    if len(y) < 2:
        return None, None, None
    groups = np.arange(len(y)) if units is None else np.unique(np.asarray(units), return_inverse=True)[1]
    members = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        a = fast_metrics(y[idx], probs_a[idx])["auc"]
        b = fast_metrics(y[idx], probs_b[idx])["auc"]
        if not (np.isnan(a) or np.isnan(b)):
            diffs.append(a - b)
    if len(diffs) < n_boot // 2:
        return None, None, None
    d = np.round(diffs, 12)  # AUCs are multiples of 1/(positives x negatives): exact ties at 0 count
    alpha = (1 - ci) / 2
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha)), p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: controls the chance of any false "A differs from B" over the family."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


@dataclass(frozen=True)
class Predictions:
    """One encoder's out-of-fold predictions: slide id -> (class index, class probabilities)."""

    name: str
    by_slide: Mapping[str, tuple[int, np.ndarray]]


def compare_to_best(
    runs: Sequence[Predictions],
    *,
    best: str,
    patients: Mapping[str, str] | None,
    n_boot: int,
    ci: float,
    seed: int,
) -> list[dict]:
    """One row per other encoder: ``best`` minus it on the slides both classified, with the paired
    bootstrap CI (over patients where ``patients`` maps slide ids to them), a p-value and Holm-adjusted
    p over all rows. The p is DeLong's for binary studies whose units are slides; with several slides
    per patient (DeLong would count them as independent), more classes, or a DeLong variance of 0 with
    different AUCs, it is the paired bootstrap's (``test`` says which)."""
    reference = next(r for r in runs if r.name == best)
    rows = []
    for other in runs:
        if other.name == best:
            continue
        shared = sorted(set(reference.by_slide) & set(other.by_slide))
        y = np.array([reference.by_slide[s][0] for s in shared], dtype=int)
        pa = np.array([reference.by_slide[s][1] for s in shared], dtype=float)
        pb = np.array([other.by_slide[s][1] for s in shared], dtype=float)
        units = [patients.get(s, s) for s in shared] if patients else None
        low, high, p_boot = paired_bootstrap(y, pa, pb, units=units, n_boot=n_boot, ci=ci, seed=seed)
        auc_a, auc_b = (fast_metrics(y, p)["auc"] if len(shared) else float("nan") for p in (pa, pb))
        clustered = units is not None and len(set(units)) < len(units)
        binary = len(shared) > 0 and pa.shape[1] == 2 and min(int(y.sum()), int((1 - y).sum())) >= 2
        test = delong(y, pa[:, 1], pb[:, 1]) if binary and not clustered else None
        if test is not None and np.isnan(test.p):
            test = None
        rows.append(
            {
                "best": best,
                "other": other.name,
                "n_slides": len(shared),
                "n_units": len(set(units)) if units else len(shared),
                "auc_best": _defined(auc_a),
                "auc_other": _defined(auc_b),
                "diff": _defined(auc_a - auc_b),
                "ci_low": low,
                "ci_high": high,
                "test": "delong" if test else "bootstrap",
                "p": test.p if test else p_boot,
            }
        )
    defined = [i for i, r in enumerate(rows) if r["p"] is not None]
    for i, adjusted in zip(defined, holm([rows[i]["p"] for i in defined]), strict=True):
        rows[i]["p_holm"] = adjusted
    for row in rows:
        row.setdefault("p_holm", None)
    return rows


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
