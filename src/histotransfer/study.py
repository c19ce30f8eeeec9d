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
from histotransfer.finetune_stage import finetune_study
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
    for encoder_id in config.finetune.encoders:
        _finetune(config, outputs, with_tiles, encoder_id, settings, overwrite=overwrite)
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
    weights = {e.id: e.weights for e in config.extraction.encoders}.get(best.encoder_id)
    try:
        result = export_study_model(
            best.out_dir,
            out=config.output_dir / "onnx" / config.export.name,
            weights=weights,
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


def _finetune(
    config: StudyConfig, outputs: StudyOutputs, records, encoder_id: str, settings, *, overwrite: bool
) -> None:
    """Fine-tune one encoder in every fold and re-run MIL on its features; failures are recorded."""
    specs = {e.id: e for e in config.extraction.encoders}
    if encoder_id not in specs:
        outputs.errors[f"{encoder_id} (fine-tuning)"] = "not among extraction.encoders: add it there first"
        return
    if encoder_id in outputs.errors or not any(r.encoder_id == encoder_id for r in outputs.mil):
        outputs.errors[f"{encoder_id} (fine-tuning)"] = "its frozen-feature MIL did not finish"
        return
    failed = {o.slide_id for o in outputs.stages[f"extract {encoder_id}"].failed}
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
        return
    for fold, stage in result.extraction.items():
        outputs.stages[f"extract {result.finetuned_id} fold{fold}"] = stage
    outputs.mil.append(result.mil)
    fold = config.cka.fold
    if fold not in result.fold_encoders:
        outputs.errors[f"{encoder_id} (cka)"] = f"cka.fold {fold} is not a fold of this study"
        return
    tuned = build_encoder(result.finetuned_id, weights=result.fold_encoders[fold])
    tiles = sample_tiles(records, outputs.tiles_dir, n_tiles=config.cka.tiles, seed=config.cka.seed)
    cka = compare(frozen, tuned, tiles, batch_size=config.cka.batch_size, device=str(settings.device))
    outputs.cka.append(
        write_cka(outputs.mil_dir.parent / "cka", encoder_id, f"{result.finetuned_id}-fold{fold}", cka)[0]
    )


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
