"""The MIL stage for one encoder: cross-validated training, out-of-fold predictions, metrics with
confidence intervals, attention per tile, ROC curve, heatmaps and the attention localisation score.

Output per the contract under ``{out_dir}/{encoder_id}/``: ``fold{k}/model.pt`` (+ ``history.json``),
``predictions.csv``, ``metrics.json`` (written last: its presence with a matching config hash means done),
``attention/{slide_id}.h5``, ``roc.png``, ``heatmaps/{slide_id}.png``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from histotransfer import __version__
from histotransfer.core.config import EvaluationConfig, MILConfig, results_of
from histotransfer.core.encoder_ids import ENCODER_ID
from histotransfer.features.bags import BagStore, FeaturesError
from histotransfer.io import lineage
from histotransfer.io.atomic import atomic_dir, atomic_path, write_text_atomic
from histotransfer.io.layout import (
    HISTORY_FILE,
    MODEL_FILE,
    CohortLayout,
    MILLayout,
    fold_name,
    slide_file,
)
from histotransfer.io.lineage import FeatureSet
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.marks import MARK_KEY, mark
from histotransfer.io.provenance import config_hash, is_current, read_json, sealed_json
from histotransfer.mil.evaluation import (
    fold_summary,
    localisation_auroc,
    point_metrics,
    seed_summary,
    with_confidence,
)
from histotransfer.mil.results import MILResult, class_rocs, roc_points, several_slides_per_patient
from histotransfer.mil.splits import Fold, make_folds, site_folds
from histotransfer.mil.training import FoldModel, SlidePrediction, predict_slides, train_fold
from histotransfer.plots import attention_heatmap, roc_curves
from histotransfer.wsi.geometry import tissue_fractions
from histotransfer.wsi.tiling import load_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LesionMasks:
    """Ground-truth lesion masks (the sample cohort's ``masks/``), at ``downsample`` of level 0."""

    folder: Path
    downsample: float

    @classmethod
    def beside(cls, manifest: Path) -> LesionMasks | None:
        cohort = CohortLayout(Path(manifest).parent)
        if not cohort.meta.is_file():
            return None
        meta = read_json(cohort.meta, redo="build the sample cohort again", keys=("mask_downsample",))
        return cls(cohort.masks, float(meta["mask_downsample"]))

    def tile_labels(
        self, slide_id: str, coords: np.ndarray, patch_size_level0: int, fraction: float
    ) -> np.ndarray | None:
        path = slide_file(self.folder, slide_id, ".png")
        if not path.is_file():
            return None
        mask = np.asarray(Image.open(path)) > 0
        d = self.downsample
        inside = tissue_fractions(
            mask, mask_downsample=(d, d), coords_lv0=coords, patch_size_lv0=patch_size_level0
        )
        return inside >= fraction


def _hashed_settings(mil: MILConfig) -> dict[str, Any]:
    """The MIL settings a result's resume hash covers. Not mil.compare: it makes other results. The
    paper's head and the gated one keep the key they had before mil.aggregator existed (attention:
    paper | gated), so that results trained before are still current."""
    settings = {k: v for k, v in results_of("mil", mil).items() if k != "compare"}
    if settings["aggregator"] in ("abmil", "gated"):
        settings["attention"] = "paper" if settings.pop("aggregator") == "abmil" else "gated"
    return settings


def _stage_config(
    records,
    feature_sets: Mapping[str, FeatureSet],
    mil: MILConfig,
    evaluation: EvaluationConfig,
    folds: Sequence[Fold] | None = None,
) -> dict[str, Any]:
    """What a MIL result is made from: the settings, the cohort and the features' content (resume
    trains again when any feature file was made again, differently); given folds, those."""
    settings = evaluation.model_dump(mode="json")
    if settings["cv"] == "patient":  # the default, which results made before it existed had
        del settings["cv"]
    made_from = {
        "stage": "mil",
        "mil": _hashed_settings(mil),
        "evaluation": settings,
        "cohort": [(r.slide_id, r.label, r.patient_id, r.split) for r in records],
        "features": {k: fs.digest for k, fs in feature_sets.items()},
    }
    if "cv" in settings:
        made_from["sites"] = [(r.slide_id, r.site) for r in records]
    if folds is not None:
        made_from["folds"] = [(f.index, f.train, f.val, f.test) for f in folds]
    return made_from


def _save_fold(out: MILLayout, fold_model) -> None:
    """``fold{k}/``: the head (tensors only: loads with weights_only=True) and its history.json, which
    records the head's sha256; the folder appears whole or not at all."""
    with atomic_dir(out.fold_dir(fold_model.fold.index)) as stage:
        torch.save(fold_model.model.state_dict(), stage / MODEL_FILE)
        _write_history(stage, fold_model)


def _write_history(stage: Path, fold_model) -> None:
    summary = {
        "fold": fold_model.fold.index,
        "best_epoch": fold_model.best_epoch,
        "restart": fold_model.restart,
        "restarts": fold_model.restarts,
        "train": list(fold_model.fold.train),
        "val": list(fold_model.fold.val),
        "test": list(fold_model.fold.test),
        "history": fold_model.history,
        "files": lineage.files_record(stage, [MODEL_FILE]),
    }
    (stage / HISTORY_FILE).write_text(sealed_json(mark(summary)), encoding="utf-8")


def _write_predictions(path: Path, preds: Sequence[SlidePrediction], classes: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "fold", "prediction", *(f"prob_{c}" for c in classes)])
        for p in preds:
            row = [p.slide_id, classes[p.label], p.fold, classes[int(p.probs.argmax())]]
            # every digit of the float32 probability: rounded, a confident model's probabilities tie
            # (0.99999994 and 0.99999988 both 1.000000) and AUCs read back from here differ from the study's
            writer.writerow(row + [f"{float(v):.9g}" for v in p.probs])


def _write_attention(path: Path, pred: SlidePrediction, coords: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("attention", data=pred.attention.astype(np.float32))  # (n_tiles,)
        f.create_dataset("coords", data=coords)  # (n_tiles, 2), same order as tiles and features
        f.attrs.update({MARK_KEY: __version__, "slide_id": pred.slide_id, "fold": pred.fold})


def _encoder_id(feature_set: FeatureSet) -> str:
    """The id the features record (it names the output folder: it must follow the id grammar; features
    made outside the registry keep their own architecture name)."""
    recorded = str(feature_set.encoder["id"])
    if ENCODER_ID.match(recorded) is None:
        raise FeaturesError(
            f"{feature_set.folder}: the features record the encoder id {recorded!r}, which is not an id "
            "(ARCH[@CUT][+WEIGHTS], see `histotransfer encoders`)"
        )
    return recorded


def feature_sets_of(
    records: Sequence[SlideRecord], dirs: Mapping[int | None, Path], tiles_dir: Path | None
) -> dict[int | None, FeatureSet]:
    """Each features folder checked (histotransfer.io.lineage.check_features) against the study's tiles: a
    per-fold folder (``features/{id}/fold{k}``) is its parent's encoder's."""
    tiles = lineage.check_tiles(tiles_dir, records) if tiles_dir is not None else None
    return {
        k: lineage.check_features(d, records, encoder_id=d.name if k is None else d.parent.name, tiles=tiles)
        for k, d in dirs.items()
    }


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
    feature_sets: Mapping[int | None, FeatureSet] | None = None,
    folds: Sequence[Fold] | None = None,
) -> MILResult:
    """Cross-validate attention-MIL on one encoder's features; reuse a current result.

    ``features_dir`` is one folder, or one folder per fold index (fine-tuned encoders: fold k's slides
    are encoded by fold k's encoder, which never saw that fold's test slides). ``feature_sets``: the
    folders as the stage checked them (default: checked here), recorded in the result's lineage.
    ``folds``: the folds to use instead of those these records make (fine-tuned encoders: the folds
    each fold's encoder was fine-tuned in, less slides that failed, so no test slide was trained on).
    """
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise FeaturesError(f"the cohort has a single label ({classes}); MIL needs at least two classes")
    dirs = features_dir if isinstance(features_dir, dict) else {None: features_dir}
    feature_sets = feature_sets if feature_sets is not None else feature_sets_of(records, dirs, tiles_dir)
    stores = {
        k: BagStore(records, d, classes=classes, cache_gb=mil.bag_cache_gb / len(dirs))
        for k, d in dirs.items()
    }
    first = next(iter(stores.values()))
    encoder_id = _encoder_id(next(iter(feature_sets.values())))
    named = {("*" if k is None else f"fold{k}"): fs for k, fs in feature_sets.items()}

    def store_for(fold_index: int) -> BagStore:
        return stores[fold_index if fold_index in stores else None]

    out = MILLayout.of(out_dir, encoder_id)
    expected = config_hash(_stage_config(records, named, mil, evaluation, folds))
    if not overwrite and is_current(out.metrics, expected):
        return MILResult.load(out.dir)
    # per-fold fine-tuned encoders saw every site's slides: not evaluated out of site
    by_site = evaluation.cv == "site" and len(stores) == 1 and folds is None
    # the site folds' errors (no site, one site, ...) before the first model is trained
    site_split = site_folds(records, val_fraction=mil.holdout_fraction, seed=mil.seed) if by_site else None
    lesions = lesion_labels(records, first, tiles_dir, lesion_masks, evaluation)
    per_fold = []

    def keep_fold(fold_model: FoldModel, fold_preds: list[SlidePrediction]) -> None:
        _save_fold(out, fold_model)
        _, _, metrics = _evaluate(fold_preds, evaluation, seed=mil.seed)
        fold = fold_model.fold
        per_fold.append(
            {"fold": fold.index, "n_test": len(fold.test), "best_epoch": fold_model.best_epoch, **metrics}
        )

    preds = cross_validate(
        records,
        mil,
        n_classes=len(classes),
        store_for=store_for,
        on_fold=keep_fold,
        desc=f"mil {encoder_id}",
        folds=folds,
    )
    _write_predictions(out.predictions, preds, classes)
    y, probs, pooled = _evaluate(preds, evaluation, seed=mil.seed)
    _write_attention_outputs(records, preds, store_for, out, tiles_dir, evaluation, classes)
    localisation = localisation_summary(preds, lesions)
    if (points := roc_points(y, probs)) is not None:
        roc_curves(out.roc, {encoder_id: (*points, pooled["auc"]["value"])}, f"{encoder_id}: out-of-fold ROC")
    elif len(classes) > 2 and (curves := class_rocs(y, probs, classes)):
        roc_curves(out.roc, curves, f"{encoder_id}: out-of-fold ROC, one class vs the rest")
    metrics = {
        "config_hash": expected,
        "encoder_id": encoder_id,
        "aggregator": mil.aggregator,
        "feature_dim": first.dim,
        "classes": classes,
        "n_slides": len(preds),
        "folds": per_fold,
        "fold_summary": fold_summary(per_fold),
        "pooled": pooled,
        "localisation": localisation,
        # per-fold encoders (fine-tuned) saw their fold's training slides: other folds would leak
        "seeds": _repeat_seeds(
            records,
            first,
            mil,
            lesions,
            primary=(preds, localisation),
            repeats=mil.seeds if len(stores) == 1 else 1,
        ),
    }
    written = [f"{fold_name(f['fold'])}/{name}" for f in per_fold for name in (MODEL_FILE, HISTORY_FILE)]
    written.append(out.predictions.name)
    metrics["evaluation"] = {"bootstrap": evaluation.bootstrap, "ci": evaluation.ci}  # the report's too
    if site_split is not None:
        metrics["sites"] = site_holdout(records, first, mil, evaluation, site_split, in_site=preds, out=out)
        written.append(out.site_predictions.name)
    else:
        out.site_predictions.unlink(missing_ok=True)  # of an earlier run with evaluation.cv: site
        if evaluation.cv == "site":
            metrics["sites"] = {"skipped": FINETUNED_NOT_BY_SITE}
    # the report's paired comparisons resample patients, not slides, when a patient has several slides
    metrics["patients"] = several_slides_per_patient(records)
    if metrics["patients"] is not None:
        metrics["patient_level"] = patient_level(preds, metrics["patients"], evaluation, seed=mil.seed)
    metrics["lineage"] = lineage.mil_record(named, records, lineage.files_record(out.dir, written))
    write_text_atomic(out.metrics, sealed_json(mark(metrics)))
    return MILResult(encoder_id, out.dir, metrics, reused=False)


FINETUNED_NOT_BY_SITE = (
    "each fold's features come from an encoder fine-tuned in that fold, on slides of every site: "
    "site-held-out folds would test slides its encoders were trained on"
)


def site_holdout(
    records: Sequence[SlideRecord],
    store: BagStore,
    mil: MILConfig,
    evaluation: EvaluationConfig,
    folds: Mapping[str, Fold],
    *,
    in_site: Sequence[SlidePrediction],
    out: MILLayout,
) -> dict[str, Any]:
    """Site-held-out evaluation (``evaluation.cv: site``): the same training with one scanning site
    held out per fold (``folds``: ``site_folds``'s); the out-of-site predictions in
    ``predictions_by_site.csv``; pooled metrics with CIs of them (slides resampled), and per site the
    AUC of its slides when held out (``auc_out``) and in the patient-grouped folds, where other slides of
    its site were trained on (``auc_in``, of ``in_site``), with their means over the sites that have both
    classes."""
    out_of_site = cross_validate(
        records,
        mil,
        n_classes=len(store.classes),
        store_for=lambda _: store,
        desc=f"mil {store.encoder_id} by site",
        folds=list(folds.values()),
    )
    _write_predictions(out.site_predictions, out_of_site, store.classes)
    _, _, pooled = _evaluate(out_of_site, evaluation, seed=mil.seed)
    site_of = {r.slide_id: str(r.site) for r in records}

    def site_auc(preds: Sequence[SlidePrediction], site: str) -> float | None:
        mine = [p for p in preds if site_of[p.slide_id] == site]
        if not mine:
            return None
        y, probs = np.array([p.label for p in mine]), np.stack([p.probs for p in mine])
        auc = point_metrics(y, probs)["auc"]
        return None if np.isnan(auc) else float(auc)  # one class only at this site

    per_site = {
        site: {
            "n_slides": len(fold.test),
            "auc_in": site_auc(in_site, site),
            "auc_out": site_auc(out_of_site, site),
        }
        for site, fold in folds.items()
    }
    both = [v for v in per_site.values() if v["auc_in"] is not None and v["auc_out"] is not None]
    return {
        "folds": [{"fold": fold.index, "site": site} for site, fold in folds.items()],
        "out_of_site": pooled,  # the in-site numbers are the result's own: metrics["pooled"]
        "per_site": per_site,
        "mean_site_auc": {
            "in": float(np.mean([v["auc_in"] for v in both])) if both else None,
            "out": float(np.mean([v["auc_out"] for v in both])) if both else None,
            "n_sites": len(both),
        },
    }


PATIENT_RULE = "mean of the patient's out-of-fold slide probabilities"


def patient_level(
    preds: Sequence[SlidePrediction], patients: Mapping[str, str], evaluation: EvaluationConfig, *, seed: int
) -> dict[str, Any]:
    """Patient-level metrics with CIs (patients resampled): a patient's probabilities are the mean of its
    slides' out-of-fold probabilities (folds group patients, so one model predicted all of them), its
    label their one label. Skipped, with the reason, when a patient's slides have different labels."""
    by_patient: dict[str, list[SlidePrediction]] = {}
    for p in preds:
        by_patient.setdefault(patients[p.slide_id], []).append(p)
    mixed = sorted(pid for pid, ps in by_patient.items() if len({p.label for p in ps}) > 1)
    if mixed:
        return {
            "rule": PATIENT_RULE,
            "skipped": f"patients with slides of different labels ({', '.join(mixed[:5])}"
            + (f" and {len(mixed) - 5} more" if len(mixed) > 5 else "")
            + "): a patient-level label needs one label per patient",
        }
    ids = sorted(by_patient)
    y = np.array([by_patient[pid][0].label for pid in ids])
    probs = np.stack([np.mean([p.probs for p in by_patient[pid]], axis=0) for pid in ids])
    pooled = with_confidence(y, probs, n_boot=evaluation.bootstrap, ci=evaluation.ci, seed=seed)
    return {"rule": PATIENT_RULE, "n_patients": len(ids), "pooled": pooled}


def study_folds(records: Sequence[SlideRecord], mil: MILConfig) -> list[Fold]:
    """The cross-validation folds of ``mil`` (its seed; a validation holdout only with val_loss
    selection), or the manifest's split."""
    return make_folds(records, n_folds=mil.folds, val_fraction=mil.holdout_fraction, seed=mil.seed)


def cross_validate(
    records: Sequence[SlideRecord],
    mil: MILConfig,
    *,
    n_classes: int,
    store_for: Callable[[int], BagStore],
    on_fold: Callable[[FoldModel, list[SlidePrediction]], None] | None = None,
    desc: str | None = None,
    folds: Sequence[Fold] | None = None,
) -> list[SlidePrediction]:
    """Out-of-fold predictions of one cross-validation with ``mil`` (its folds, or ``folds``; its seed),
    sorted by slide. ``store_for(k)`` holds fold k's features; ``on_fold`` sees each fold's model and
    predictions."""
    folds = study_folds(records, mil) if folds is None else folds
    preds = []
    for fold in tqdm(folds, desc=desc, unit="fold", dynamic_ncols=True, disable=desc is None):
        store = store_for(fold.index)
        fold_model = train_fold(store, fold, n_classes=n_classes, cfg=mil)
        fold_preds = predict_slides(fold_model.model, store, fold.test, fold.index)
        if on_fold is not None:
            on_fold(fold_model, fold_preds)
        preds += fold_preds
    return sorted(preds, key=lambda p: p.slide_id)


def _repeat_seeds(
    records, store: BagStore, mil: MILConfig, lesions, *, primary, repeats: int
) -> dict[str, Any]:
    """The primary cross-validation's point metrics and those of ``repeats - 1`` more with seeds
    ``seed+1, seed+2, ...`` (new folds, new inits), summarised over seeds."""
    preds, localisation = primary
    y = np.array([p.label for p in preds])
    rows = [(mil.seed, point_metrics(y, np.stack([p.probs for p in preds])), localisation["mean_auroc"])]
    for extra in tqdm(range(1, repeats), desc="mil seeds", unit="seed", disable=repeats < 2):
        cfg = mil.model_copy(update={"seed": mil.seed + extra})
        repeat = cross_validate(records, cfg, n_classes=len(store.classes), store_for=lambda _: store)
        probs = np.stack([p.probs for p in repeat])
        rows.append((cfg.seed, point_metrics(y, probs), localisation_summary(repeat, lesions)["mean_auroc"]))
    return seed_summary(rows)


def _evaluate(preds: Sequence[SlidePrediction], evaluation: EvaluationConfig, *, seed: int):
    """Labels (n,), probabilities (n, classes) and metrics with CIs of a set of predictions."""
    y = np.array([p.label for p in preds])
    probs = np.stack([p.probs for p in preds])
    return y, probs, with_confidence(y, probs, n_boot=evaluation.bootstrap, ci=evaluation.ci, seed=seed)


def _write_attention_outputs(records, preds, store_for, out, tiles_dir, evaluation, classes) -> None:
    """Attention files for every slide; heatmaps for the first ``evaluation.heatmaps`` of them: in a
    binary study the positive slides, most confident first; otherwise the most confident slides."""
    by_id = {r.slide_id: r for r in records}
    positive = len(classes) - 1 if len(classes) == 2 else None

    def order(p: SlidePrediction) -> tuple[bool, float]:
        if positive is not None:
            return (p.label != positive, -p.probs[positive] if p.label == positive else 0.0)
        return (False, -p.probs[p.label])

    draw = {p.slide_id for p in sorted(preds, key=order)[: evaluation.heatmaps]}  # sort is stable
    for pred in preds:
        coords = store_for(pred.fold).coords(pred.slide_id)
        _write_attention(out.attention(pred.slide_id), pred, coords)
        if tiles_dir is not None and pred.slide_id in draw:
            attention_heatmap(
                by_id[pred.slide_id].path,
                coords,
                pred.attention,
                patch_size_level0=load_tiles(slide_file(tiles_dir, pred.slide_id)).patch_size_level0,
                out=out.heatmap(pred.slide_id),
            )


def lesion_labels(
    records, store: BagStore, tiles_dir, lesion_masks: LesionMasks | None, evaluation: EvaluationConfig
) -> dict[str, np.ndarray]:
    """Per slide with a ground-truth lesion mask: which of its tiles (in bag order) are lesion."""
    if lesion_masks is None or tiles_dir is None:
        return {}
    labels = {}
    for record in records:
        patch_lv0 = load_tiles(slide_file(tiles_dir, record.slide_id)).patch_size_level0
        lesion = lesion_masks.tile_labels(
            record.slide_id, store.coords(record.slide_id), patch_lv0, evaluation.lesion_tile_fraction
        )
        if lesion is not None and lesion.any():
            labels[record.slide_id] = lesion
    return labels


def localisation_summary(preds: Sequence[SlidePrediction], lesions: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean AUROC of tile attention against the lesion tiles, over the slides that have both kinds."""
    scores = {}
    for pred in preds:
        if pred.slide_id in lesions:
            score = localisation_auroc(pred.attention, lesions[pred.slide_id])
            if score is not None:
                scores[pred.slide_id] = score
    if not scores:
        return {"mean_auroc": None, "n_slides": 0, "per_slide": {}}
    return {"mean_auroc": float(np.mean(list(scores.values()))), "n_slides": len(scores), "per_slide": scores}
