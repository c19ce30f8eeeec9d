"""The whole study in-process (`histotransfer run`): each stage reuses what is already current."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from histotransfer.bags import FeaturesError
from histotransfer.cka_stage import compare, sample_tiles, write_cka
from histotransfer.config import StudyConfig
from histotransfer.encoders import build_encoder
from histotransfer.errors import ExportError
from histotransfer.export import best_result, export_study_model
from histotransfer.extraction import extract_cohort, settings_from
from histotransfer.finetune_stage import finetune_study, finetuned_id, fold_encoder_file
from histotransfer.manifest import read_manifest
from histotransfer.mil_stage import LesionMasks, MILResult, train_mil
from histotransfer.report import write_report
from histotransfer.runner import StageResult
from histotransfer.sample_data import build_sample_cohort
from histotransfer.splits import SplitError
from histotransfer.tiling import tile_cohort
from histotransfer.training import TrainingError
from histotransfer.weights import WeightsError

log = logging.getLogger(__name__)


@dataclass
class StudyOutputs:
    manifest: Path
    tiles_dir: Path
    features_dir: Path
    mil_dir: Path
    report: Path | None = None
    stages: dict[str, StageResult] = field(default_factory=dict)
    mil: list[MILResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # encoder id -> why its MIL stage failed
    cka: list[Path] = field(default_factory=list)  # cka/{a}__{b}.json files
    bundle: Path | None = None  # onnx/{name}/: the best model, for `histotransfer predict`


def run_study(config: StudyConfig, *, overwrite: bool = False) -> StudyOutputs:
    """Run every configured stage under ``config.output_dir``; failed slides are reported, not raised."""
    out = config.output_dir
    if config.manifest is not None:
        manifest = config.manifest
    else:
        log.info("building the sample cohort under %s", out / "cohort")
        manifest = build_sample_cohort(out / "cohort", config=config.sample_data)
    records = read_manifest(manifest)
    outputs = StudyOutputs(
        manifest=manifest, tiles_dir=out / "tiles", features_dir=out / "features", mil_dir=out / "mil"
    )
    tiled = tile_cohort(records, out_dir=outputs.tiles_dir, tiling=config.tiling, overwrite=overwrite)
    outputs.stages["tile"] = tiled
    failed = {o.slide_id for o in tiled.failed}
    with_tiles = [r for r in records if r.slide_id not in failed]
    settings = settings_from(config.extraction)
    for spec in config.extraction.encoders:
        encoder = build_encoder(spec.id, weights=spec.weights)
        extracted = extract_cohort(
            with_tiles,
            tiles_dir=outputs.tiles_dir,
            out_dir=outputs.features_dir,
            encoder=encoder,
            settings=settings,
            overwrite=overwrite,
        )
        outputs.stages[f"extract {spec.id}"] = extracted
        _train(config, outputs, extracted, with_tiles, str(encoder.id), overwrite=overwrite)
    finetune_and_compare(config, outputs, with_tiles, overwrite=overwrite)
    if config.export.enabled and outputs.mil:
        _export(config, outputs, overwrite=overwrite)
    outputs.report = write_report(
        outputs.mil,
        report_dir=out / "report",
        tiles_dir=outputs.tiles_dir,
        cka=outputs.cka,
        bundle=outputs.bundle,
    )
    return outputs


def _export(config: StudyConfig, outputs: StudyOutputs, *, overwrite: bool) -> None:
    """Export the best model of the study as an ONNX bundle; a failure is recorded, not raised."""
    best = best_result(outputs.mil)
    try:
        result = export_study_model(
            best.out_dir,
            out=config.output_dir / "onnx" / config.export.name,
            weights=config.extraction.weights_for(best.encoder_id),
            fold=config.export.fold,
            tiles_dir=outputs.tiles_dir,
            fp16=config.export.fp16,
            overwrite=overwrite,
        )
    except (ExportError, WeightsError) as exc:
        log.error("exporting %s failed: %s", best.encoder_id, exc)
        outputs.errors[f"{best.encoder_id} (export)"] = f"{type(exc).__name__}: {exc}"
        return
    outputs.bundle = result.path


def finetune_and_compare(
    config: StudyConfig, outputs: StudyOutputs, records, *, overwrite: bool = False, cka: bool = True
) -> None:
    """Fine-tune every ``finetune.encoders`` id, run MIL on its features and (``cka``) compare it with
    the frozen encoder by CKA.

    Frozen MIL results not yet in ``outputs.mil`` are loaded from ``outputs.mil_dir`` (a stage that
    runs on its own, as a pipeline step, starts with none).
    """
    settings = settings_from(config.extraction)
    for encoder_id in config.finetune.encoders:
        done = outputs.mil_dir / encoder_id / "metrics.json"
        if not any(r.encoder_id == encoder_id for r in outputs.mil) and done.is_file():
            outputs.mil.append(MILResult.load(done.parent))
        frozen = _finetune(config, outputs, records, encoder_id, settings, overwrite=overwrite)
        if cka and frozen is not None:
            compare_finetuned(config, outputs, records, encoder_id, frozen=frozen)


def compare_finetuned(
    config: StudyConfig, outputs: StudyOutputs, records, encoder_id: str, *, frozen=None
) -> Path | None:
    """CKA of the frozen encoder vs fold ``cka.fold``'s fine-tuned one: ``cka/{a}__{b}.json``."""
    fold = config.cka.fold
    weights = fold_encoder_file(outputs.mil_dir.parent / "finetune", encoder_id, fold)
    if not weights.is_file():
        outputs.errors[f"{encoder_id} (cka)"] = f"no fine-tuned encoder for cka.fold {fold} ({weights})"
        return None
    if frozen is None:
        frozen = build_encoder(encoder_id, weights=config.extraction.weights_for(encoder_id))
    tuned_id = finetuned_id(encoder_id)
    tuned = build_encoder(tuned_id, weights=weights)
    tiles = sample_tiles(records, outputs.tiles_dir, n_tiles=config.cka.tiles, seed=config.cka.seed)
    device = str(settings_from(config.extraction).device)
    result = compare(frozen, tuned, tiles, batch_size=config.cka.batch_size, device=device)
    path = write_cka(outputs.mil_dir.parent / "cka", encoder_id, f"{tuned_id}-fold{fold}", result)[0]
    outputs.cka.append(path)
    return path


def _finetune(
    config: StudyConfig, outputs: StudyOutputs, records, encoder_id: str, settings, *, overwrite: bool
):
    """Fine-tune one encoder in every fold and re-run MIL on its features; failures are recorded.
    Returns the frozen encoder it started from (None on failure)."""
    specs = {e.id: e for e in config.extraction.encoders}
    if encoder_id not in specs:
        outputs.errors[f"{encoder_id} (fine-tuning)"] = "not among extraction.encoders: add it there first"
        return None
    if encoder_id in outputs.errors or not any(r.encoder_id == encoder_id for r in outputs.mil):
        outputs.errors[f"{encoder_id} (fine-tuning)"] = "its frozen-feature MIL did not finish"
        return None
    stage = outputs.stages.get(f"extract {encoder_id}")
    if stage is not None:
        failed = {o.slide_id for o in stage.failed}
    else:  # features made by another process: the slides that have them
        have = outputs.features_dir / encoder_id
        failed = {r.slide_id for r in records if not (have / f"{r.slide_id}.h5").is_file()}
    try:
        frozen = build_encoder(encoder_id, weights=specs[encoder_id].weights)
        result = finetune_study(
            [r for r in records if r.slide_id not in failed],
            encoder=frozen,
            features_dir=outputs.features_dir,
            tiles_dir=outputs.tiles_dir,
            mil_dir=outputs.mil_dir,
            finetune_dir=outputs.mil_dir.parent / "finetune",
            mil=config.mil,
            cfg=config.finetune,
            evaluation=config.evaluation,
            settings=settings,
            lesion_masks=LesionMasks.beside(outputs.manifest),
            overwrite=overwrite,
        )
    except (FeaturesError, SplitError, TrainingError, WeightsError) as exc:
        log.error("fine-tuning %s failed: %s", encoder_id, exc)
        outputs.errors[f"{encoder_id} (fine-tuning)"] = f"{type(exc).__name__}: {exc}"
        return None
    for fold, stage in result.extraction.items():
        outputs.stages[f"extract {result.finetuned_id} fold{fold}"] = stage
    outputs.mil.append(result.mil)
    if config.cka.fold not in result.fold_encoders:
        outputs.errors[f"{encoder_id} (cka)"] = f"cka.fold {config.cka.fold} is not a fold of this study"
        return None
    return frozen


def _train(
    config: StudyConfig,
    outputs: StudyOutputs,
    extracted: StageResult,
    records,
    encoder_id: str,
    *,
    overwrite: bool,
) -> None:
    """MIL for one encoder on the slides it has features for; a failure is recorded, not raised."""
    failed = {o.slide_id for o in extracted.failed}
    try:
        result = train_mil(
            [r for r in records if r.slide_id not in failed],
            features_dir=outputs.features_dir / encoder_id,
            out_dir=outputs.mil_dir,
            mil=config.mil,
            evaluation=config.evaluation,
            tiles_dir=outputs.tiles_dir,
            lesion_masks=LesionMasks.beside(outputs.manifest),
            overwrite=overwrite,
        )
    except (FeaturesError, SplitError, TrainingError) as exc:
        log.error("MIL for %s failed: %s", encoder_id, exc)
        outputs.errors[encoder_id] = f"{type(exc).__name__}: {exc}"
        return
    outputs.mil.append(result)
