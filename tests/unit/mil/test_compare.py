"""Paired comparisons (histotransfer.mil.compare) against plain float64 references on small data."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from histotransfer.mil.compare import Predictions, compare_to_best, delong, holm, paired_bootstrap


def _delong_by_pairs(y, a, b):
    """DeLong's test from its definition: every (positive, negative) pair compared, ties counting half."""
    y = y.astype(bool)
    comps10, comps01, aucs = [], [], []
    for s in (a, b):
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        comps10.append(psi.mean(axis=1))
        comps01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = y.sum(), (~y).sum()
    s10, s01 = np.cov(np.array(comps10)), np.cov(np.array(comps01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    return aucs[0], aucs[1], z, 2 * norm.sf(abs(z))


def _correlated_scores(rng, n, shift_a, shift_b):
    """Two noisy readings of one latent score: the AUCs are correlated, as two encoders' on one cohort."""
    y = rng.integers(0, 2, n)
    latent = rng.normal(0, 1, n)
    a = latent + shift_a * y + rng.normal(0, 1, n)
    b = latent + shift_b * y + rng.normal(0, 1, n)
    return y, a, b


@pytest.mark.parametrize("seed", range(5))
def test_delong_equals_its_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y, a, b = _correlated_scores(rng, 40 + 13 * seed, 1.0, 0.5)
    a, b = np.round(a, 1), np.round(b, 0)  # ties within and across classes
    got = delong(y, a, b)
    auc_a, auc_b, z, p = _delong_by_pairs(y, a, b)
    assert got.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert (got.auc_a, got.auc_b, got.z, got.p) == pytest.approx((auc_a, auc_b, z, p), rel=1e-9, abs=1e-12)


def test_delong_holds_its_level_and_finds_a_real_difference():
    rng = np.random.default_rng(0)
    null = [delong(*_correlated_scores(rng, 60, 1.0, 1.0)).p for _ in range(400)]
    assert 0.02 <= np.mean(np.array(null) < 0.05) <= 0.09  # a 5% test rejects about 5% of true nulls
    strong = [delong(*_correlated_scores(rng, 60, 2.0, 0.0)).p for _ in range(50)]
    assert np.mean(np.array(strong) < 0.05) > 0.9


def test_delong_on_the_same_ranking_finds_nothing_and_needs_two_of_each_class():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert delong(y, s, s * 2 + 1).p == 1.0  # another scale, the same ranking
    with pytest.raises(ValueError, match="at least 2 cases of each class, got 1 and 3"):
        delong(np.array([0, 0, 0, 1]), s[:4], s[:4])


def _probs(score):
    p = 1 / (1 + np.exp(-score))
    return np.stack([1 - p, p], axis=1)


@pytest.mark.parametrize("clustered", [False, True])
def test_paired_bootstrap_is_the_plain_loop_over_slides_or_patients(clustered):
    rng = np.random.default_rng(3)
    y, a, b = _correlated_scores(rng, 30, 1.5, 0.5)
    patients = [f"p{i // 3}" for i in range(30)] if clustered else None
    low, high, p = paired_bootstrap(y, _probs(a), _probs(b), units=patients, n_boot=300, ci=0.9, seed=11)
    # the reference: draw units, take all their slides, compute both AUCs with scikit-learn
    ids = np.unique(patients, return_inverse=True)[1] if clustered else np.arange(30)
    draw = np.random.default_rng(11)
    diffs = []
    for _ in range(300):
        picked = draw.integers(0, ids.max() + 1, ids.max() + 1)
        idx = np.concatenate([np.flatnonzero(ids == u) for u in picked])
        if len(set(y[idx])) == 2:
            diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert (low, high) == pytest.approx(tuple(np.quantile(diffs, [0.05, 0.95])), abs=1e-12)
    d = np.round(diffs, 9)  # a difference of 0 computed two ways may differ in the last bits
    assert p == pytest.approx(min(1, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; made monotone: 0.06 last
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_compare_to_best_pairs_the_slides_both_classified_and_counts_patients():
    rng = np.random.default_rng(5)
    y, a, b = _correlated_scores(rng, 40, 2.0, 0.2)
    slides = [f"s{i}" for i in range(40)]
    best = Predictions("best", {s: (int(y[i]), _probs(a)[i]) for i, s in enumerate(slides)})
    other = Predictions("other", {s: (int(y[i]), _probs(b)[i]) for i, s in enumerate(slides) if i != 7})
    weak = Predictions("weak", {s: (int(y[i]), _probs(-a)[i]) for i, s in enumerate(slides)})
    patients = {s: f"p{i // 2}" for i, s in enumerate(slides)}
    rows = compare_to_best([other, best, weak], best="best", patients=patients, n_boot=200, ci=0.95, seed=0)
    assert [r["other"] for r in rows] == ["other", "weak"]
    first = rows[0]
    keep = np.arange(40) != 7
    assert first["diff"] == pytest.approx(roc_auc_score(y[keep], a[keep]) - roc_auc_score(y[keep], b[keep]))
    # patients with two slides each: the interval resamples them, and the p is the bootstrap's, not DeLong's
    assert (first["n_slides"], first["n_units"], first["test"]) == (39, 20, "bootstrap")
    units = [f"p{i // 2}" for i in range(40) if i != 7]
    expected = paired_bootstrap(
        y[keep], _probs(a)[keep], _probs(b)[keep], units=units, n_boot=200, ci=0.95, seed=0
    )
    assert (first["ci_low"], first["ci_high"], first["p"]) == pytest.approx(expected)
    assert first["ci_low"] < first["diff"] < first["ci_high"]
    (by_slide,) = compare_to_best([other, best], best="best", patients=None, n_boot=200, ci=0.95, seed=0)
    assert (by_slide["n_units"], by_slide["test"]) == (39, "delong")
    assert by_slide["p"] == pytest.approx(delong(y[keep], a[keep], b[keep]).p)
    assert rows[1]["diff"] > 0.5
    assert rows[1]["p_holm"] < 0.001
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))


def test_a_multi_class_comparison_uses_the_bootstrap_p():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 45)
    good = np.eye(3)[y] * 2 + rng.normal(0, 1, (45, 3))
    noise = rng.normal(0, 1, (45, 3))
    soft = [np.exp(x) / np.exp(x).sum(axis=1, keepdims=True) for x in (good, noise)]
    runs = [
        Predictions(name, {f"s{i}": (int(y[i]), p[i]) for i in range(45)})
        for name, p in zip("ab", soft, strict=True)
    ]
    (row,) = compare_to_best(runs, best="a", patients=None, n_boot=200, ci=0.95, seed=0)
    assert row["test"] == "bootstrap"
    assert row["p"] < 0.05
    assert row["ci_low"] > 0


def test_the_same_predictions_differ_by_nothing_and_disjoint_slides_give_an_empty_row():
    rng = np.random.default_rng(4)
    y, a, _ = _correlated_scores(rng, 30, 1.0, 1.0)
    same = {f"s{i}": (int(y[i]), _probs(a)[i]) for i in range(30)}
    (row,) = compare_to_best(
        [Predictions("a", same), Predictions("b", same)], best="a", patients=None, n_boot=100, ci=0.95, seed=0
    )
    assert (row["diff"], row["ci_low"], row["ci_high"], row["p"], row["p_holm"]) == (0.0, 0.0, 0.0, 1.0, 1.0)
    elsewhere = Predictions("c", {f"t{i}": v for i, v in enumerate(same.values())})
    (row,) = compare_to_best(
        [Predictions("a", same), elsewhere], best="a", patients=None, n_boot=100, ci=0.95, seed=0
    )
    assert row["n_slides"] == 0
    assert [row[k] for k in ("diff", "ci_low", "ci_high", "p", "p_holm")] == [None] * 5
