"""Cross-validation folds: stratified by label, grouped by patient, optionally with a validation part;
and site-held-out folds (one scanning site tested per fold).

See docs/adr/0005-folds-and-evaluation.md. A manifest with a `split` column defines one fold instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from histotransfer.core.errors import SplitError
from histotransfer.io.manifest import SlideRecord


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]  # slide ids used to fit
    val: tuple[str, ...]  # slide ids for model selection (may be empty), never the test ones
    test: tuple[str, ...]  # slide ids evaluated only


def _holdout(ids: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """Split ``ids`` into (fit, val) with about ``fraction`` in val, grouped, stratified when possible."""
    _, counts = np.unique(labels, return_counts=True)
    n_splits = min(round(1 / fraction), len(np.unique(groups)))
    if counts.min() >= 2:
        splitter = StratifiedGroupKFold(
            n_splits=max(2, min(n_splits, counts.min())), shuffle=True, random_state=seed
        )
        fit, val = next(splitter.split(ids, labels, groups))
    else:  # a class with one training slide cannot be in both parts: split by patient only
        fit, val = next(GroupKFold(n_splits=max(2, n_splits)).split(ids, labels, groups))
    return ids[fit], ids[val]


def _fit_val(ids, labels, groups, val_fraction: float, seed: int, single: str):
    """A fold's training part split into (fit, val): ``val_fraction`` of its patients held out, none with
    0; ``single``: the error when it has one patient, who cannot be in both."""
    if val_fraction == 0:
        return ids, ids[:0]
    if len(np.unique(groups)) < 2:
        raise SplitError(single)
    return _holdout(ids, labels, groups, val_fraction, seed)


def _ids(values) -> tuple[str, ...]:
    return tuple(sorted(str(v) for v in values))


def make_folds(records: Sequence[SlideRecord], *, n_folds: int, val_fraction: float, seed: int) -> list[Fold]:
    """Folds over slides; no patient appears in two parts of a fold, nor in two test sets.

    ``val_fraction`` of each fold's training patients are held out for validation; 0 holds out none.
    """
    if any(r.split for r in records):
        return [_manifest_fold(records)]
    ids = np.array([r.slide_id for r in records])
    labels = np.array([r.label for r in records])
    groups = np.array([r.patient_id for r in records])
    classes, counts = np.unique(labels, return_counts=True)
    n_patients = len(np.unique(groups))
    if n_folds > n_patients or counts.min() < n_folds:
        label_counts = {str(c): int(n) for c, n in zip(classes, counts, strict=True)}
        raise SplitError(
            f"cannot make {n_folds} folds from {n_patients} patients with label counts {label_counts}: "
            "lower mil.folds, or add slides"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (train_idx, test_idx) in enumerate(splitter.split(ids, labels, groups)):
        single = (
            f"fold {k}: its training part has a single patient, which cannot also give validation slides; "
            f"use fewer mil.folds (now {n_folds}), mil.selection: last, or a `split` column"
        )
        fit, val = _fit_val(
            ids[train_idx], labels[train_idx], groups[train_idx], val_fraction, seed + k, single
        )
        folds.append(Fold(k, _ids(fit), _ids(val), _ids(ids[test_idx])))
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    fix = f"use fewer mil.folds (now {n_folds}) or a `split` column in the manifest" + (
        ", or mil.selection: last (no validation holdout), or a larger mil.val_fraction"
        if val_fraction > 0
        else ""
    )
    for fold in folds:
        check_fold(fold, label_of, fix=fix)
    return folds


def site_folds(records: Sequence[SlideRecord], *, val_fraction: float, seed: int) -> dict[str, Fold]:
    """Site-held-out folds (``evaluation.cv: site``) by site: fold k tests the slides of the k-th site
    (sorted by name) and trains on the other sites' slides, ``val_fraction`` of their patients held out
    for validation as in ``make_folds``. Every slide needs a site, no patient may span two sites, every
    fold's training part needs every class, and a manifest split (one fixed fold) is not combined."""
    fix = "or set evaluation.cv: patient"
    if split := [r for r in records if r.split]:
        raise SplitError(
            f"evaluation.cv: site holds out each scanning site in turn, but the manifest's split column "
            f"fixes "
            f"one train/test split (line {split[0].line}: {split[0].split}): empty the split column, {fix}"
        )
    unsited = [r for r in records if not r.site]
    if unsited:
        lines = ", ".join(f"{r.slide_id} (line {r.line})" for r in unsited[:5])
        more = f" and {len(unsited) - 5} more" if len(unsited) > 5 else ""
        raise SplitError(
            f"evaluation.cv: site holds out one scanning site per fold, but the manifest's site column is "
            f"empty or missing for {lines}{more}: give every slide its site, {fix}"
        )
    sites = sorted({str(r.site) for r in records})
    if len(sites) < 2:
        raise SplitError(
            f"evaluation.cv: site needs slides from two sites or more; every slide is from {sites[0]!r}: "
            f"{fix}"
        )
    by_patient: dict[str, set[str]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, set()).add(str(r.site))
    if spanning := sorted(p for p, s in by_patient.items() if len(s) > 1):
        named = "; ".join(f"{p} ({', '.join(sorted(by_patient[p]))})" for p in spanning[:5])
        raise SplitError(
            f"patients with slides from more than one site: {named}; a site-held-out fold would train on "
            f"the patient it tests: give each patient one site, {fix}"
        )
    ids = np.array([r.slide_id for r in records])
    labels = np.array([r.label for r in records])
    groups = np.array([r.patient_id for r in records])
    site_of = np.array([str(r.site) for r in records])
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    folds = {}
    for k, site in enumerate(sites):
        train = site_of != site
        single = (
            f"site {site!r} held out: the other sites have a single patient, which cannot also give "
            f"validation slides; use mil.selection: last, {fix}"
        )
        fit, val = _fit_val(ids[train], labels[train], groups[train], val_fraction, seed + k, single)
        fold = Fold(k, _ids(fit), _ids(val), _ids(ids[~train]))
        check_fold(
            fold,
            label_of,
            fix=f"site {site!r} is held out in fold {k}: add slides of that class from other sites (a "
            f"validation part without it: mil.selection: last holds none out), {fix}",
        )
        folds[site] = fold
    return folds


def check_fold(fold: Fold, label_of: dict[str, object], *, fix: str, validation: bool = True) -> None:
    """Every class of the cohort must be in a fold's training part, and (``validation``) in its
    validation part when it has one: a model cannot learn a class it never sees, nor be selected on a
    loss without it. ``fix``: what the user can change, said in the error."""
    for part, ids in (("training", fold.train), ("validation", fold.val if validation else ())):
        present = {str(label_of[i]) for i in ids}
        if part == "validation" and not ids:
            continue
        for label in sorted({str(v) for v in label_of.values()} - present):
            n = sum(str(v) == label for v in label_of.values())
            raise SplitError(
                f"fold {fold.index}: class {label!r} has no slide in the {part} part ({n} slide(s) of "
                f"it in the cohort); {fix}"
            )


def _manifest_fold(records: Sequence[SlideRecord]) -> Fold:
    missing = [r.slide_id for r in records if not r.split]
    if missing:
        raise SplitError(
            f"the manifest's split column is empty for {', '.join(missing[:10])}: fill it for every row"
        )
    parts = {s: tuple(sorted(r.slide_id for r in records if r.split == s)) for s in ("train", "val", "test")}
    by_patient: dict[str, set[str]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    leaking = sorted(p for p, splits in by_patient.items() if len(splits) > 1)
    if leaking:
        raise SplitError(f"patients in more than one split: {', '.join(leaking[:10])}")
    if not parts["train"] or not parts["test"]:
        raise SplitError("a manifest split needs train and test slides (val slides are optional)")
    fold = Fold(0, parts["train"], parts["val"], parts["test"])
    labels = {r.slide_id: r.label for r in records}  # the user chose the val part: it is not checked
    check_fold(fold, labels, fix="give the train part slides of that class", validation=False)
    return fold
