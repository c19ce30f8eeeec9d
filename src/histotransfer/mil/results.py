"""A finished MIL result and its ROC curves, read back from the files the MIL stage wrote. Torch-free:
the report, export's choice of model and the pipelines' metrics read results without importing torch
(histotransfer.mil.crossval, which trains them, re-exports all of this)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from histotransfer.io.layout import MILLayout
from histotransfer.io.provenance import read_json


@dataclass
class MILResult:
    encoder_id: str
    out_dir: Path
    metrics: dict[str, Any]
    reused: bool

    @classmethod
    def load(cls, out_dir: Path) -> MILResult:
        """A finished MIL result from its folder (``metrics.json`` is written last)."""
        redo = "train this encoder again (histotransfer train ... --overwrite, or rerun the study)"
        keys = ("encoder_id", "classes", "feature_dim", "pooled", "localisation", "fold_summary")
        metrics = read_json(MILLayout(Path(out_dir)).metrics, redo=redo, keys=keys)
        return cls(metrics["encoder_id"], Path(out_dir), metrics, reused=True)

    def oof_predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Out-of-fold (labels, probabilities (n, classes), predicted classes) from predictions.csv,
        class indices in ``metrics["classes"]`` order."""
        classes, rows = self.metrics["classes"], self._prediction_rows()
        y = np.array([classes.index(row["label"]) for row in rows], dtype=int)
        probs = np.array([_probs(row, classes) for row in rows]).reshape(len(rows), -1)
        predicted = np.array([classes.index(row["prediction"]) for row in rows], dtype=int)
        return y, probs, predicted

    def oof_by_slide(self) -> dict[str, tuple[int, np.ndarray]]:
        """Out-of-fold predictions by slide id: (class index, probabilities)."""
        classes, rows = self.metrics["classes"], self._prediction_rows()
        return {row["slide_id"]: (classes.index(row["label"]), _probs(row, classes)) for row in rows}

    def _prediction_rows(self) -> list[dict[str, str]]:
        with MILLayout(self.out_dir).predictions.open(newline="") as f:
            return list(csv.DictReader(f))

    @classmethod
    def load_all(cls, mil_dir: Path) -> list[MILResult]:
        """Every finished MIL result under ``mil_dir`` (``{mil_dir}/{encoder_id}/metrics.json``)."""
        return [cls.load(m.dir) for m in MILLayout.finished(mil_dir)]

    def rank_key(self) -> tuple[float, float, float]:
        """Sort key, best first: pooled AUC, then balanced accuracy, then attention localisation."""

        def value(x: float | None) -> float:
            return -(x if x is not None else -1.0)

        pooled = self.metrics["pooled"]
        return (
            value(pooled["auc"]["value"]),
            value(pooled["balanced_accuracy"]["value"]),
            value(self.metrics["localisation"]["mean_auroc"]),
        )


def binary_roc(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(fpr, tpr, thresholds) of the positive (second) class; None when a class is absent or there are >2."""
    if probs.shape[1] != 2 or len(np.unique(y_true)) < 2:
        return None
    return roc_curve(y_true, probs[:, 1])


def roc_points(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of binary_roc."""
    roc = binary_roc(y_true, probs)
    return None if roc is None else (roc[0], roc[1])


def class_rocs(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest (fpr, tpr, auc) per class present with others (a multi-class study's curves)."""
    curves = {}
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            curves[name] = (fpr, tpr, float(roc_auc_score(positive, probs[:, k])))
    return curves


def classification_summary(mil_dir: Path) -> dict[str, Any]:
    """What a UI shows for a MIL result: scalar metrics, the pooled ROC, the confusion matrix."""
    result = MILResult.load(mil_dir)
    metrics, classes = result.metrics, result.metrics["classes"]
    y, probs, predicted = result.oof_predictions()
    matrix = confusion_matrix(y, predicted, labels=list(range(len(classes)))).tolist()
    roc = None
    if (curve := binary_roc(y, probs)) is not None:
        fpr, tpr, thresholds = curve
        thresholds = np.minimum(thresholds, 1.0)  # sklearn's first threshold is +inf
        roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}
    scalars = {
        name: entry["value"] for name, entry in metrics["pooled"].items() if entry.get("value") is not None
    }
    if metrics["localisation"]["mean_auroc"] is not None:
        scalars["localisation_auroc"] = metrics["localisation"]["mean_auroc"]
    scalars |= evaluation_scalars(metrics)
    return {
        "encoder": metrics["encoder_id"],
        "metrics": scalars,
        "classes": classes,
        "confusion_matrix": matrix,
        "roc": roc,
    }


def evaluation_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The AUC with the test site held out (``evaluation.cv: site``: ``auc_out_of_site``) and over
    patients (several slides per patient: ``auc_patient``), each with its interval, as trackers keep them
    (KFP's Metrics, DVC's metrics.json); only those the result has."""
    out = {}
    sources = {
        "auc_out_of_site": (metrics.get("sites") or {}).get("out_of_site", {}),
        "auc_patient": (metrics.get("patient_level") or {}).get("pooled", {}),
    }
    for name, pooled in sources.items():
        auc = pooled.get("auc", {})
        if auc.get("value") is None:
            continue
        out[name] = auc["value"]
        if auc.get("ci_low") is not None:
            out |= {f"{name}_ci_low": auc["ci_low"], f"{name}_ci_high": auc["ci_high"]}
    return out


def _probs(row: dict[str, str], classes: Sequence[str]) -> np.ndarray:
    return np.array([float(row[f"prob_{c}"]) for c in classes])


def several_slides_per_patient(records: Sequence[Any]) -> dict[str, str] | None:
    """slide id -> patient id when some patient has more than one slide (else None: slides are the units)."""
    patients = {r.slide_id: r.patient_id for r in records}
    return patients if len(set(patients.values())) < len(patients) else None
