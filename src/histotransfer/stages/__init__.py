"""The study's stages, each wired here and only here.

A stage takes a StudyLayout (where things are), the validated StudyConfig (how to do them) and the
cohort's records, and owns everything in between: which weights an encoder id gets (an explicit file
wins, else the config's), which device, which slides go on (those an earlier stage did not record as
failed in its summary), resuming (current outputs are reused unless ``overwrite``) and where its
summary goes. `histotransfer run`, every CLI subcommand, the KFP orchestration and DVC (through the
CLI) call these functions and nothing below them.

Slide-parallel stages (tile, extract) return a StageResult and never raise for one bad slide; the
others raise the library's errors (FeaturesError, SplitError, TrainingError, WeightsError, ...).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotransfer import lineage
from histotransfer.config import StudyConfig
from histotransfer.errors import BundleError, ConfigError, ExportError, FeaturesError
from histotransfer.layout import BUNDLE_SPEC, SUMMARY, StudyLayout
from histotransfer.manifest import SlideRecord, read_manifest
from histotransfer.outputs import claim_output
from histotransfer.runner import StageResult

if TYPE_CHECKING:  # the heavy modules are imported by the stage that needs them
    from histotransfer.deploy.export import ExportResult
    from histotransfer.features.encoders import Encoder
    from histotransfer.features.extraction import EngineSettings
    from histotransfer.finetune.study import FinetuneOutputs
    from histotransfer.mil.results import MILResult

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ helpers


def failed_in(summary: Path) -> set[str]:
    """The slides a stage's ``summary.csv`` records as failed (none when it has no summary)."""
    if not summary.is_file():
        return set()
    try:
        with summary.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"slide_id", "status"} <= set(reader.fieldnames or ()):
                raise KeyError("no slide_id and status columns")
            return {row["slide_id"] for row in reader if row.get("status") == "failed"}
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError) as exc:
        raise FeaturesError(
            f"{summary} is not a summary histotransfer wrote ({type(exc).__name__}: {exc}): run the stage "
            "that writes it again (its outputs are resumed), or remove the file"
        ) from exc


def going_on(records: Sequence[SlideRecord], summary: Path, what: str) -> list[SlideRecord]:
    """``records`` without the slides that ``summary`` records as failed (they are reported there)."""
    failed = failed_in(summary)
    if dropped := [r.slide_id for r in records if r.slide_id in failed]:
        log.warning("%d slide(s) left out: %s failed on them (see %s)", len(dropped), what, summary)
    return [r for r in records if r.slide_id not in failed]


def tiled(layout: StudyLayout, records: Sequence[SlideRecord]) -> list[SlideRecord]:
    """The slides whose tiling did not fail (all of them when the layout has no tiles folder)."""
    if not layout.has("tiles"):
        return list(records)
    return going_on(records, layout.tiles / SUMMARY, "tiling")


def tiles_folder(layout: StudyLayout) -> Path:
    """The layout's tiles folder, which a stage reading tiles needs to exist."""
    if layout.tiles.is_file():
        raise FeaturesError(
            f"--tiles {layout.tiles} is a file, not a tiles folder: give the folder that `histotransfer "
            "tile` wrote"
        )
    if not layout.tiles.is_dir():
        raise FeaturesError(
            f"tiles folder {layout.tiles} not found: tile the cohort first "
            f"(`histotransfer tile MANIFEST --out {layout.tiles}`), or give --tiles the folder it wrote"
        )
    return layout.tiles


def featured(layout: StudyLayout, records: Sequence[SlideRecord], encoder_id: str) -> list[SlideRecord]:
    """The tiled slides whose feature extraction with ``encoder_id`` did not fail."""
    folder = layout.features_dir(encoder_id)
    return going_on(tiled(layout, records), folder / SUMMARY, f"extraction with {encoder_id}")


def weights_for(config: StudyConfig, encoder_id: str, weights: str | Path | None = None) -> str | Path | None:
    """An encoder's weights: the ones given, else the ones the config lists for it (e.g. a tagged id
    such as ``densenet121+kimianet`` whose checkpoint only params.yaml names), else its default."""
    return weights if weights else config.extraction.weights_for(encoder_id)


def engine(config: StudyConfig) -> EngineSettings:
    """The extraction engine the config asks for, its device checked: call before building models."""
    from histotransfer.features.extraction import settings_from

    return settings_from(config.extraction)


def build(config: StudyConfig, encoder_id: str, weights: str | Path | None = None) -> Encoder:
    from histotransfer.features.encoders import build_encoder

    return build_encoder(encoder_id, weights=weights_for(config, encoder_id, weights))


def lesion_masks(layout: StudyLayout):
    from histotransfer.mil.study import LesionMasks

    return LesionMasks.beside(layout.manifest)


# ------------------------------------------------------------------------------------------- stages


def sample_cohort(layout: StudyLayout, config: StudyConfig) -> Path:
    """The sample cohort (slides, masks, manifest) in the layout's cohort folder, reused when current."""
    from histotransfer.wsi.sample_data import build_sample_cohort

    claim_output(layout.cohort, "cohort")
    log.info("building the sample cohort under %s", layout.cohort)
    return build_sample_cohort(layout.cohort, config=config.sample_data)


def cohort(layout: StudyLayout, config: StudyConfig) -> list[SlideRecord]:
    """The cohort's records: the layout's manifest, or the sample cohort, built (or reused) first."""
    if config.manifest is None:
        sample_cohort(layout, config)
    return read_manifest(layout.manifest)


def tile(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    *,
    overwrite: bool = False,
    summary: Path | None = None,
) -> StageResult:
    """Tiles and QC pictures of every slide under ``layout.tiles``."""
    from histotransfer.wsi.tiling import tile_cohort

    claim_output(layout.tiles, "tiles", inputs=[layout.manifest])
    return tile_cohort(
        records,
        out_dir=layout.tiles,
        tiling=config.tiling,
        overwrite=overwrite,
        summary_path=summary,
    )


@dataclass(frozen=True)
class Extracted:
    encoder: Encoder
    result: StageResult


def extract(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    weights: str | Path | None = None,
    overwrite: bool = False,
    summary: Path | None = None,
) -> Extracted:
    """Features of the tiled slides with one encoder under ``features/{encoder_id}/``."""
    from histotransfer.features.extraction import extract_cohort

    settings = engine(config)  # devices first, then folders: a bad device leaves nothing behind
    claim_output(
        layout.features, "features", inputs=[tiles_folder(layout)], lock=layout.features_dir(encoder_id)
    )
    usable = tiled(layout, records)
    lineage.check_tiles(layout.tiles, usable)  # the tiles are those of the manifest's slides
    encoder = build(config, encoder_id, weights)
    folder = layout.features_dir(str(encoder.id))
    result = extract_cohort(
        usable,
        tiles_dir=layout.tiles,
        out_dir=folder,
        encoder=encoder,
        settings=settings,
        overwrite=overwrite,
        summary_path=summary,
    )
    return Extracted(encoder, result)


def train(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    overwrite: bool = False,
) -> MILResult:
    """Cross-validated attention-MIL on one encoder's features: ``mil/{encoder_id}/``."""
    from histotransfer.mil.study import train_mil

    tiles = layout.tiles if layout.has("tiles") else None
    folder = layout.features_dir(encoder_id)
    if folder.is_dir() and not any(folder.glob("*.h5")) and (inner := sorted(folder.glob("*/*.h5"))):
        names = sorted({p.parent.name for p in inner})
        if all(name.startswith("fold") for name in names):
            raise FeaturesError(
                f"{folder} holds the per-fold features of a fine-tuned encoder ({', '.join(names)}): "
                "`histotransfer finetune` trains MIL on them (each fold's slides with that fold's encoder)"
            )
        raise FeaturesError(
            f"{folder} holds the features of encoders ({', '.join(names[:5])}), not features: give "
            f"--features one encoder's folder, e.g. {folder / names[0]}"
        )
    claim_output(layout.mil, "mil", inputs=[folder, tiles], lock=layout.mil_result(encoder_id).dir)
    usable = featured(layout, records, encoder_id)
    if records and not usable:
        raise FeaturesError(
            f"no slide has features for {encoder_id}: every one failed in tiling or extraction (see the "
            f"summary.csv in {tiles or 'the tiles folder'} and {layout.features_dir(encoder_id)})"
        )
    tiles_made = lineage.check_tiles(tiles, usable) if tiles is not None else None
    features = lineage.check_features(layout.features_dir(encoder_id), usable, tiles=tiles_made)
    return train_mil(
        usable,
        features_dir=features.folder,
        out_dir=layout.mil,
        mil=config.mil,
        evaluation=config.evaluation,
        tiles_dir=tiles,  # without: no heatmaps, no localisation
        lesion_masks=lesion_masks(layout),
        overwrite=overwrite,
        feature_sets={None: features},
    )


def finetune(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    weights: str | Path | None = None,
    overwrite: bool = False,
) -> FinetuneOutputs:
    """Attention top-k fine-tuning of ``encoder_id`` in every fold of its frozen MIL result, then
    features (``features/{id}+ft/fold{k}/``) and MIL (``mil/{id}+ft/``) again."""
    from histotransfer.encoder_ids import finetuned_id
    from histotransfer.finetune.study import finetune_study
    from histotransfer.mil.results import MILResult

    if not (frozen := layout.mil_result(encoder_id)).metrics.is_file():
        raise FeaturesError(
            f"{frozen.dir} has no finished MIL result: fine-tuning starts from the "
            f"frozen features' MIL (run extraction and `histotransfer train` for {encoder_id} first)"
        )
    settings = engine(config)
    tuned = finetuned_id(encoder_id)
    locks = {
        "finetune": layout.finetune_dir(encoder_id),
        "features": layout.features_dir(tuned),
        "mil": layout.mil_result(tuned).dir,
    }
    for section, lock in locks.items():  # it reads these sections too: no input check
        claim_output(getattr(layout, section), section, lock=lock)
    usable = featured(layout, records, encoder_id)
    tiles = lineage.check_tiles(tiles_folder(layout), usable)
    lineage.check_slides(usable, tiles)  # fine-tuning reads its tiles from the slides
    features = lineage.check_features(layout.features_dir(encoder_id), usable, tiles=tiles)
    encoder = build(config, encoder_id, weights)
    lineage.check_mil(
        frozen.dir,
        MILResult.load(frozen.dir).metrics.get("lineage"),
        folds=frozen.folds(),
        weights=(encoder.weights_sha256, encoder.weights_source),
        features=features,
        records=usable,
        weights_fix="give --weights the checkpoint given to extract, or leave it out to use the config's",
    )
    return finetune_study(
        usable,
        encoder=encoder,
        features=features,
        layout=layout,
        mil=config.mil,
        cfg=config.finetune,
        evaluation=config.evaluation,
        settings=settings,
        lesion_masks=lesion_masks(layout),
        overwrite=overwrite,
    )


def compare_encoders(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    a: str,
    b: str,
    *,
    weights_a: str | Path | None = None,
    weights_b: str | Path | None = None,
    name_a: str | None = None,
    name_b: str | None = None,
) -> Path:
    """Layer-by-layer CKA of encoders ``a`` and ``b`` (ids, with their weights) on ``cka.tiles`` tiles of
    the study: ``cka/{a}__{b}.json`` (and its heatmap), on the config's extraction device."""
    engine(config)  # the device exists, before folders are made and models built
    claim_output(layout.cka, "cka", inputs=[tiles_folder(layout)])
    tiles = _cka_tiles(layout, config, records)
    return _compare(
        layout, config, tiles, build(config, a, weights_a), build(config, b, weights_b), name_a, name_b
    )


@dataclass(frozen=True)
class CKATiles:
    dataset: Any  # the tiles, read on the fly (torch Dataset)
    digests: dict[str, str]  # slide id -> tiles digest, of the slides sampled from


def _cka_tiles(layout: StudyLayout, config: StudyConfig, records: Sequence[SlideRecord]) -> CKATiles:
    """The tiles CKA is measured on (of the manifest's slides, as tiled); at least one whole minibatch
    (the unbiased estimator needs one)."""
    from histotransfer.cka.layers import sample_tiles

    usable = tiled(layout, records)
    made = lineage.check_tiles(layout.tiles, usable)
    lineage.check_slides(usable, made)
    usable = [r for r in usable if r.slide_id in made]
    tiles = sample_tiles(usable, layout.tiles, n_tiles=config.cka.tiles, seed=config.cka.seed)
    if len(tiles) < config.cka.batch_size:
        raise ConfigError(
            f"CKA gets {len(tiles)} tile(s) (cka.tiles {config.cka.tiles}, of {layout.tiles}), fewer than "
            f"one minibatch (cka.batch_size {config.cka.batch_size}): lower cka.batch_size or raise cka.tiles"
        )
    return CKATiles(tiles, {r.slide_id: made[r.slide_id]["digest"] for r in usable})


def _compare(
    layout, config, tiles: CKATiles, a: Encoder, b: Encoder, name_a: str | None, name_b: str | None
) -> Path:
    from histotransfer.cka.layers import layer_cka, write_cka

    device = str(engine(config).device)
    result = layer_cka(a, b, tiles.dataset, batch_size=config.cka.batch_size, device=device)
    name_a, name_b = name_a or str(a.id), name_b or str(b.id)
    made_from = lineage.cka_record(_encoder_record(a), _encoder_record(b), tiles.digests)
    return write_cka(*layout.cka_files(name_a, name_b), name_a, name_b, result, made_from)[0]


def _encoder_record(encoder: Encoder) -> dict[str, str]:
    return {
        "id": str(encoder.id),
        "weights_sha256": encoder.weights_sha256,
        "weights_source": encoder.weights_source,
    }


def cka(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    weights: str | Path | None = None,
) -> Path:
    """The frozen ``encoder_id`` vs fold ``cka.fold``'s fine-tuned copy of it."""
    from histotransfer.encoder_ids import finetuned_id
    from histotransfer.features.encoders import build_encoder

    fold = config.cka.fold
    engine(config)
    claim_output(layout.cka, "cka", inputs=[tiles_folder(layout)])
    tuned_weights = layout.finetune_fold(encoder_id, fold).encoder
    if not tuned_weights.is_file():
        raise FeaturesError(
            f"no fine-tuned encoder for cka.fold {fold} ({tuned_weights}): fine-tune {encoder_id} first, "
            "or set cka.fold to a fold of the study"
        )
    tiles = _cka_tiles(layout, config, records)
    tuned_id = finetuned_id(encoder_id)
    tuned = build_encoder(tuned_id, weights=tuned_weights)
    history = layout.finetune_fold(encoder_id, fold).history
    lineage.check_finetuned(history, tuned)
    frozen = build(config, encoder_id, weights)
    lineage.check_weights(
        f"the fine-tuned encoder of {history.parent}",
        lineage.read_record(history, "finetune")["frozen"]["encoder"],
        frozen.weights_sha256,
        frozen.weights_source,
        "compare it with the encoder it was fine-tuned from: give --weights-a the checkpoint given to "
        "extract, or leave it out to use the config's",
    )
    return _compare(layout, config, tiles, frozen, tuned, None, f"{tuned_id}-fold{fold}")


def best_mil_result(layout: StudyLayout, results: Sequence[MILResult] | None = None) -> Path:
    """The best of ``results`` (default: every finished MIL result of the study), as the report ranks
    them (its first row)."""
    from histotransfer.deploy.export import best_result
    from histotransfer.mil.results import MILResult

    results = MILResult.load_all(layout.mil) if results is None else results
    if not results:
        raise ExportError(
            f"no MIL results under {layout.mil}: run the study (or `histotransfer train`) first"
        )
    return best_result(list(results)).out_dir


def export(
    layout: StudyLayout,
    config: StudyConfig,
    *,
    mil_dir: Path | None = None,
    out: Path | None = None,
    weights: str | Path | None = None,
    expect_encoder: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """A MIL result (default: the study's best) as an ONNX bundle (default: ``onnx/{export.name}/``).

    One fold's head goes in (``export.fold``, else the fold with the lowest loss), with its encoder:
    for a fine-tuned id, that fold's fine-tuned encoder from the layout's finetune section.
    """
    from histotransfer.deploy.export import choose_fold, export_study_model, finished_result
    from histotransfer.encoder_ids import frozen_id

    mil_dir = Path(mil_dir) if mil_dir is not None else best_mil_result(layout)
    out = Path(out) if out is not None else layout.bundle(config.export.name)
    claim_output(out, "bundle", inputs=[mil_dir, layout.tiles])
    encoder_id = finished_result(mil_dir).encoder_id
    fold = config.export.fold
    if fold is None:
        fold = choose_fold(mil_dir)[0]
    if weights is None and (base := frozen_id(encoder_id)) is not None:
        tuned = layout.finetune_fold(base, fold)
        weights = tuned.encoder
        if not weights.is_file():
            raise ExportError(f"{weights} not found: the fine-tuned encoder of fold {fold} is missing")
        lineage.check_finetuned_file(tuned.history, weights)  # the study's encoder.pt is that fold's
    return export_study_model(
        mil_dir,
        out=out,
        weights=weights_for(config, encoder_id, weights),
        fold=fold,
        tiles_dir=layout.tiles,
        fp16=config.export.fp16,
        overwrite=overwrite,
        expect_encoder=expect_encoder,
    )


def report(
    layout: StudyLayout,
    *,
    results: Sequence[MILResult] | None = None,
    cka: Sequence[Path] | None = None,
    bundle: Path | None = None,
    tracking: bool = False,
) -> Path:
    """``report/index.html`` and ``summary.md``: of ``results``, ``cka`` and ``bundle`` (defaults: every
    finished MIL result and CKA comparison of the study, its one bundle if it has one); ``tracking``:
    also DVC's ``metrics.json`` and ``plots/``."""
    from histotransfer.mil.results import MILResult
    from histotransfer.report import write_report, write_tracking
    from histotransfer.verify import check

    if results is None:
        results = MILResult.load_all(layout.mil)
        if not results:
            raise FeaturesError(
                f"no MIL results under {layout.mil}: run `histotransfer run` or `train` first"
            )
        if bundle is None and len(bundles := layout.bundles()) == 1:
            bundle = bundles[0]
        elif bundle is None and bundles:
            names = ", ".join(str(b) for b in bundles)
            log.warning("the study has %d bundles (%s): give --bundle to describe one", len(bundles), names)
    if bundle is not None and not (bundle / BUNDLE_SPEC).is_file():
        raise BundleError(f"--bundle {bundle} is not a bundle (no {BUNDLE_SPEC}): give STUDY/onnx/NAME")
    fixed = "move them out: a study's report is always written there"
    claim_output(layout.report, "report", inputs=[layout.mil], fix=fixed)
    if tracking:
        claim_output(layout.tracking_plots, "plots", fix=fixed)
    path = write_report(
        results,
        report_dir=layout.report,
        tiles_dir=layout.tiles,
        cka=layout.cka_results() if cka is None else cka,
        bundle=bundle,
        verification=check(layout.report.parent),
    )
    if tracking:
        write_tracking(results, metrics=layout.tracking_metrics, plots=layout.tracking_plots)
    return path


def predict(
    bundle_dir: Path,
    slides: str,
    out: Path,
    *,
    mpp: float | None = None,
    batch_size: int | None = None,
    readers: int | None = None,
    threads: int | None = None,
    heatmaps: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Classify ``slides`` (a slide, a gs:// URI or a manifest) with the ONNX bundle in ``bundle_dir``
    into ``out`` (see PredictionLayout). Torch-free: ONNX Runtime, OpenSlide and numpy only."""
    from histotransfer.deploy.bundle import load_bundle
    from histotransfer.deploy.predict import BATCH_SIZE, predict_cohort, slides_to_classify
    from histotransfer.storage import is_gcs_uri

    local_input = None if is_gcs_uri(slides) else Path(slides)
    claim_output(out, "predictions", inputs=[bundle_dir, local_input])
    bundle = load_bundle(bundle_dir, threads=threads)
    spec = bundle.spec
    log.info(
        "bundle %s: %s, classes %s, on %s", bundle.path, spec.encoder.id, spec.classes, bundle.providers[0]
    )
    return predict_cohort(
        slides_to_classify(slides, mpp=mpp),
        bundle,
        out_dir=out,
        batch_size=batch_size or BATCH_SIZE,
        readers=readers,
        heatmaps=heatmaps,
        overwrite=overwrite,
    )
