"""Patient-level metrics: the mean of a patient's out-of-fold slide probabilities, against a plain loop."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from histotransfer.core.config import EvaluationConfig
from histotransfer.mil.crossval import patient_level
from histotransfer.mil.training import SlidePrediction


def predictions(n_patients: int, seed: int = 0, n_classes: int = 2):
    """1 to 3 slides per patient, one label per patient, noisy probabilities that lean to the label."""
    rng = np.random.default_rng(seed)
    preds, patients = [], {}
    for p in range(n_patients):
        label = p % n_classes
        for s in range(int(rng.integers(1, 4))):
            logits = rng.normal(0, 1, n_classes)
            logits[label] += 0.8
            probs = np.exp(logits) / np.exp(logits).sum()
            slide = f"p{p:02d}-s{s}"
            preds.append(SlidePrediction(slide, label, p % 3, probs.astype(np.float32), np.ones(3) / 3))
            patients[slide] = f"p{p:02d}"
    return preds, patients


@pytest.mark.parametrize("n_classes", [2, 3])
def test_patient_metrics_are_those_of_the_mean_slide_probabilities(n_classes):
    preds, patients = predictions(30, n_classes=n_classes)
    level = patient_level(preds, patients, EvaluationConfig(bootstrap=200), seed=0)
    by_patient: dict[str, list] = {}
    for p in preds:
        by_patient.setdefault(patients[p.slide_id], []).append(p)
    y = np.array([v[0].label for v in by_patient.values()])
    probs = np.stack([np.mean([p.probs for p in v], axis=0) for v in by_patient.values()])
    auc = roc_auc_score(y, probs[:, 1]) if n_classes == 2 else roc_auc_score(y, probs, multi_class="ovr")
    assert level["n_patients"] == 30
    assert level["pooled"]["auc"]["value"] == pytest.approx(auc, abs=1e-6)
    bacc = balanced_accuracy_score(y, probs.argmax(axis=1))
    assert level["pooled"]["balanced_accuracy"]["value"] == pytest.approx(bacc, abs=1e-9)
    low, high = level["pooled"]["auc"]["ci_low"], level["pooled"]["auc"]["ci_high"]
    assert low < auc < high
    assert "mean of the patient's out-of-fold slide probabilities" in level["rule"]


def test_a_patient_with_slides_of_two_labels_has_no_patient_label():
    preds, patients = predictions(6)
    preds[0] = SlidePrediction(preds[0].slide_id, 1 - preds[0].label, 0, preds[0].probs, preds[0].attention)
    level = patient_level(preds, patients, EvaluationConfig(bootstrap=100), seed=0)
    assert "pooled" not in level
    assert level["skipped"].startswith("patients with slides of different labels (p00)")


def test_predictions_csv_keeps_every_digit_of_the_probabilities(tmp_path):
    """Regression: probabilities written with 6 decimals tied a confident model's slides (0.9999999 and
    0.99999994 both 1.000000), and the report's paired comparison, which reads predictions.csv, gave
    the fine-tuned demo encoder AUC 0.719 beside the table's 0.722 for the same predictions."""
    from histotransfer.io.layout import MILLayout
    from histotransfer.mil.crossval import _write_predictions
    from histotransfer.mil.results import MILResult

    probs = np.array([[1e-7, 1 - 1e-7], [6e-8, 1 - 6e-8], [0.5, 0.5], [1 - 2.5e-7, 2.5e-7]], dtype=np.float32)
    preds = [SlidePrediction(f"s{i}", int(i < 2), 0, row, np.ones(2) / 2) for i, row in enumerate(probs)]
    out = MILLayout(tmp_path)
    _write_predictions(out.predictions, preds, ["neg", "pos"])
    result = MILResult("x", tmp_path, {"classes": ["neg", "pos"]}, reused=False)
    _, read, _ = result.oof_predictions()
    np.testing.assert_array_equal(read.astype(np.float32), probs)
    y = [p.label for p in preds]
    assert roc_auc_score(y, read[:, 1]) == roc_auc_score(y, probs[:, 1])
