"""The MIL stage for one encoder: cross-validated training, out-of-fold predictions, metrics with
confidence intervals, attention per tile, ROC curve, heatmaps and the attention localisation score.

Output per the contract under ``{out_dir}/{encoder_id}/``: ``fold{k}/model.pt`` (+ ``history.json``),
``predictions.csv``, ``metrics.json`` (written last: its presence with a matching config hash means done),
``attention/{slide_id}.h5``, ``roc.png``, ``heatmaps/{slide_id}.png``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve
from tqdm.auto import tqdm

from histotransfer.atomic import atomic_path, write_text_atomic
from histotransfer.bags import BagStore, FeaturesError
from histotransfer.config import EvaluationConfig, MILConfig
from histotransfer.encoders import parse_encoder_id
from histotransfer.evaluation import fold_summary, localisation_auroc, with_confidence
from histotransfer.geometry import tissue_fractions
from histotransfer.heatmaps import attention_heatmap
from histotransfer.manifest import SlideRecord
from histotransfer.provenance import config_hash, is_current
from histotransfer.splits import make_folds
from histotransfer.tiling import load_tiles
from histotransfer.training import SlidePrediction, predict, train_fold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LesionMasks:
    """Ground-truth lesion masks (the sample cohort's ``masks/``), at ``downsample`` of level 0."""

    folder: Path
    downsample: float

    @classmethod
    def beside(cls, manifest: Path) -> LesionMasks | None:
        meta = Path(manifest).parent / "cohort.json"
        if not meta.is_file():
            return None
        return cls(meta.parent / "masks", float(json.loads(meta.read_text())["mask_downsample"]))

    def tile_labels(
        self, slide_id: str, coords: np.ndarray, patch_size_level0: int, fraction: float
    ) -> np.ndarray | None:
        path = self.folder / f"{slide_id}.png"
        if not path.is_file():
            return None
        mask = np.asarray(Image.open(path)) > 0
        d = self.downsample
        inside = tissue_fractions(
            mask, mask_downsample=(d, d), coords_lv0=coords, patch_size_lv0=patch_size_level0
        )
        return inside >= fraction


@dataclass
class MILResult:
    encoder_id: str
    out_dir: Path
    metrics: dict[str, Any]
    reused: bool

    @classmethod
    def load(cls, out_dir: Path) -> MILResult:
        """A finished MIL result from its folder (``metrics.json`` is written last)."""
        metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
        return cls(metrics["encoder_id"], Path(out_dir), metrics, reused=True)

    def oof_predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Out-of-fold (labels, probabilities (n, classes), predicted classes) from predictions.csv,
        class indices in ``metrics["classes"]`` order."""
        classes = self.metrics["classes"]
        with (self.out_dir / "predictions.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        y = np.array([classes.index(row["label"]) for row in rows], dtype=int)
        probs = np.array([[float(row[f"prob_{c}"]) for c in classes] for row in rows]).reshape(len(rows), -1)
        predicted = np.array([classes.index(row["prediction"]) for row in rows], dtype=int)
        return y, probs, predicted

    @classmethod
    def load_all(cls, mil_dir: Path) -> list[MILResult]:
        """Every finished MIL result under ``mil_dir`` (``{mil_dir}/{encoder_id}/metrics.json``)."""
        return [cls.load(p.parent) for p in sorted(Path(mil_dir).glob("*/metrics.json"))]

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


def _stage_config(
    records, stores: Sequence[BagStore], mil: MILConfig, evaluation: EvaluationConfig
) -> dict[str, Any]:
    feature_hashes = {}
    for record in records:
        for i, store in enumerate(stores):
            with h5py.File(store.bags[record.slide_id].path, "r") as f:
                feature_hashes[f"{i}/{record.slide_id}"] = str(f.attrs.get("config_hash", ""))
    cohort = [(r.slide_id, r.label, r.patient_id, r.split) for r in records]
    return {
        "stage": "mil",
        "mil": mil.model_dump(mode="json"),
        "evaluation": evaluation.model_dump(mode="json"),
        "cohort": cohort,
        "features": feature_hashes,
    }


def _save_fold(out: Path, fold_model) -> None:
    fold_dir = out / f"fold{fold_model.fold.index}"
    with atomic_path(fold_dir / "model.pt") as tmp:
        torch.save(fold_model.model.state_dict(), tmp)  # tensors only: loads with weights_only=True
    summary = {
        "fold": fold_model.fold.index,
        "best_epoch": fold_model.best_epoch,
        "train": list(fold_model.fold.train),
        "val": list(fold_model.fold.val),
        "test": list(fold_model.fold.test),
        "history": fold_model.history,
    }
    write_text_atomic(fold_dir / "history.json", json.dumps(summary, indent=1))


def _write_predictions(path: Path, preds: Sequence[SlidePrediction], classes: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "fold", "prediction", *(f"prob_{c}" for c in classes)])
        for p in preds:
            row = [p.slide_id, classes[p.label], p.fold, classes[int(p.probs.argmax())]]
            writer.writerow(row + [f"{v:.6f}" for v in p.probs])


def _write_attention(path: Path, pred: SlidePrediction, coords: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("attention", data=pred.attention.astype(np.float32))  # (n_tiles,)
        f.create_dataset("coords", data=coords)  # (n_tiles, 2), same order as tiles and features
        f.attrs.update(slide_id=pred.slide_id, fold=pred.fold)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:
    """ROC curves, one per name: (fpr, tpr, auc)."""
    fig = Figure(figsize=(4.6, 4.2), dpi=110)
    ax = fig.subplots()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def binary_roc(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(fpr, tpr, thresholds) of the positive (second) class; None when a class is absent or there are >2."""
    if probs.shape[1] != 2 or len(np.unique(y_true)) < 2:
        return None
    return roc_curve(y_true, probs[:, 1])


def roc_points(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of binary_roc."""
    roc = binary_roc(y_true, probs)
    return None if roc is None else (roc[0], roc[1])


def _encoder_id(recorded: str, features_dir: Path) -> str:
    """The id the features record (validated: it names the output folder), else the folder's name."""
    if not recorded:
        return Path(features_dir).name
    try:
        return str(parse_encoder_id(recorded))
    except ValueError as exc:
        raise FeaturesError(f"{features_dir}: the features record an unusable encoder id ({exc})") from exc


def train_mil(
    records: Sequence[SlideRecord],
    *,
    features_dir: Path | dict[int, Path],
    out_dir: Path,
    mil: MILConfig,
    evaluation: EvaluationConfig,
    tiles_dir: Path | None = None,
    lesion_masks: LesionMasks | None = None,
    overwrite: bool = False,
) -> MILResult:
    """Cross-validate attention-MIL on one encoder's features; reuse a current result.

    ``features_dir`` is one folder, or one folder per fold index (fine-tuned encoders: fold k's slides
    are encoded by fold k's encoder, which never saw that fold's test slides).
    """
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise FeaturesError(f"the cohort has a single label ({classes}); MIL needs at least two classes")
    dirs = features_dir if isinstance(features_dir, dict) else {None: features_dir}
    stores = {
        k: BagStore(records, d, classes=classes, tiles_dir=tiles_dir, cache_gb=mil.bag_cache_gb / len(dirs))
        for k, d in dirs.items()
    }
    first = next(iter(stores.values()))
    encoder_id = _encoder_id(first.encoder_id, next(iter(dirs.values())))

    def store_for(fold_index: int) -> BagStore:
        return stores[fold_index if fold_index in stores else None]

    out = Path(out_dir) / encoder_id
    expected = config_hash(_stage_config(records, list(stores.values()), mil, evaluation))
    if not overwrite and is_current(out / "metrics.json", expected):
        return MILResult(encoder_id, out, json.loads((out / "metrics.json").read_text()), reused=True)
    folds = make_folds(records, n_folds=mil.folds, val_fraction=mil.val_fraction, seed=mil.seed)
    preds: list[SlidePrediction] = []
    per_fold = []
    for fold in tqdm(folds, desc=f"mil {encoder_id}", unit="fold", dynamic_ncols=True):
        store = store_for(fold.index)
        fold_model = train_fold(store, fold, n_classes=len(classes), cfg=mil)
        _save_fold(out, fold_model)
        fold_preds = predict(fold_model.model, store, fold.test, fold.index)
        preds += fold_preds
        _, _, metrics = _evaluate(fold_preds, evaluation, seed=mil.seed)
        per_fold.append(
            {"fold": fold.index, "n_test": len(fold.test), "best_epoch": fold_model.best_epoch, **metrics}
        )
    preds.sort(key=lambda p: p.slide_id)
    _write_predictions(out / "predictions.csv", preds, classes)
    y, probs, pooled = _evaluate(preds, evaluation, seed=mil.seed)
    localisation = _attention_outputs(
        records, preds, store_for, out, tiles_dir, lesion_masks, evaluation, classes
    )
    if (points := roc_points(y, probs)) is not None:
        plot_roc(
            out / "roc.png", {encoder_id: (*points, pooled["auc"]["value"])}, f"{encoder_id}: out-of-fold ROC"
        )
    metrics = {
        "config_hash": expected,
        "encoder_id": encoder_id,
        "feature_dim": first.dim,
        "classes": classes,
        "n_slides": len(preds),
        "folds": per_fold,
        "fold_summary": fold_summary(per_fold),
        "pooled": pooled,
        "localisation": localisation,
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    return MILResult(encoder_id, out, metrics, reused=False)


def _evaluate(preds: Sequence[SlidePrediction], evaluation: EvaluationConfig, *, seed: int):
    """Labels (n,), probabilities (n, classes) and metrics with CIs of a set of predictions."""
    y = np.array([p.label for p in preds])
    probs = np.stack([p.probs for p in preds])
    return y, probs, with_confidence(y, probs, n_boot=evaluation.bootstrap, ci=evaluation.ci, seed=seed)


def _attention_outputs(
    records, preds, store_for, out, tiles_dir, lesion_masks, evaluation, classes
) -> dict[str, Any]:
    """Attention files for every slide; heatmaps for some; localisation AUROC on positive slides."""
    by_id = {r.slide_id: r for r in records}
    scores: dict[str, float] = {}
    positive = len(classes) - 1
    # heatmaps: positive slides, most confident first, then the others in slide order (sort is stable)
    ranked = sorted(preds, key=lambda p: (p.label != positive, -p.probs[-1] if p.label == positive else 0))
    draw = {p.slide_id for p in ranked[: evaluation.heatmaps]}
    for pred in preds:
        coords = store_for(pred.fold).coords(pred.slide_id)
        _write_attention(out / "attention" / f"{pred.slide_id}.h5", pred, coords)
        if tiles_dir is None:
            continue
        patch_lv0 = load_tiles(Path(tiles_dir) / f"{pred.slide_id}.h5").patch_size_level0
        if pred.slide_id in draw:
            attention_heatmap(
                by_id[pred.slide_id].path,
                coords,
                pred.attention,
                patch_size_level0=patch_lv0,
                out=out / "heatmaps" / f"{pred.slide_id}.png",
            )
        if lesion_masks is not None and pred.label == positive:
            lesion = lesion_masks.tile_labels(
                pred.slide_id, coords, patch_lv0, evaluation.lesion_tile_fraction
            )
            if lesion is not None and (score := localisation_auroc(pred.attention, lesion)) is not None:
                scores[pred.slide_id] = score
    if not scores:
        return {"mean_auroc": None, "n_slides": 0, "per_slide": {}}
    return {"mean_auroc": float(np.mean(list(scores.values()))), "n_slides": len(scores), "per_slide": scores}
