"""The study's components, one per stage. Lightweight components: KFP ships each function's source,
so bodies import what they use; artifacts carry the study layout (histotransfer.stages.adapter)."""

import functools

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE

component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)


@component
def make_cohort(manifest: str, sample_data: dict, cohort: Output[Dataset]):
    """The cohort: the user's manifest (local path or gs:// URI; slide paths absolute or gs://), or
    the sample cohort built from real H&E pixels when ``manifest`` is "" (see pipelines/options.py)."""
    from histotransfer.stages import adapter as a

    sections = {"sample_data": sample_data}
    stats = a.call(a.run_stage, "cohort", [], cohort.path, sections=sections, manifest=manifest or None)
    cohort.metadata.update(stats)


# Three planners with one output each: kfp.local cannot loop over one output of a multi-output task.
@component
def plan_tiles(cohort: Input[Dataset], shards: int) -> list:
    """Tile shards: [{"shard": i, "shards": n}, ...] (at most one per slide)."""
    from histotransfer.stages import adapter as a

    return a.call(a.plan, cohort.path, shards=shards)[0]


@component
def plan_extraction(cohort: Input[Dataset], shards: int, extraction: dict) -> list:
    """Extraction items: one per (encoder, shard)."""
    from histotransfer.stages import adapter as a

    return a.call(a.plan, cohort.path, shards=shards, extraction=extraction)[1]


@component
def list_encoders(extraction: dict) -> list:
    """The encoder ids of the extraction section, validated."""
    from histotransfer.stages import adapter as a

    return [e.id for e in a.study_config(extraction=extraction).extraction.encoders]


@component
def tile_shard(cohort: Input[Dataset], item: dict, tiling: dict, tiles: Output[Dataset]):
    """Tile one shard of the cohort's slides (h5 + QC picture per slide)."""
    from histotransfer.stages import adapter as a

    stats = a.call(a.run_stage, "tile", [cohort.path], tiles.path, sections={"tiling": tiling}, item=item)
    tiles.metadata.update(stats)


@component
def merge_shards(parts: Input[list[Dataset]], merged: Output[Dataset]):
    """One artifact from the shards of a slide-parallel stage (per-shard summaries become one)."""
    from histotransfer.stages import adapter as a

    merged.metadata["files"] = len(a.call(a.merge, [p.path for p in parts], merged.path))


@component
def extract_shard(
    cohort: Input[Dataset], tiles: Input[Dataset], item: dict, extraction: dict, features: Output[Dataset]
):
    """Patch features of one shard's slides with one encoder (GPU when the node has one)."""
    from histotransfer.stages import adapter as a

    inputs = [cohort.path, tiles.path]
    sections = {"extraction": extraction}
    stats = a.call(a.run_stage, "extract", inputs, features.path, sections=sections, item=item)
    features.metadata.update(stats)


@component
def train_mil(
    cohort: Input[Dataset],
    tiles: Input[Dataset],
    features: Input[Dataset],
    encoder: str,
    mil: dict,
    evaluation: dict,
    model: Output[Model],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
):
    """Cross-validated attention-MIL on one encoder's features: checkpoints, predictions, heatmaps."""
    from histotransfer.stages import adapter as a

    inputs = [cohort.path, tiles.path, features.path]
    sections = {"mil": mil, "evaluation": evaluation}
    summary = a.call(a.run_stage, "train", inputs, model.path, sections=sections, encoder=encoder)
    model.metadata["encoder"] = encoder
    for name, value in summary["metrics"].items():
        metrics.log_metric(name, value)
    classification.log_confusion_matrix(summary["classes"], summary["confusion_matrix"])
    if summary["roc"]:
        roc = summary["roc"]
        classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])


@component
def merge_models(parts: Input[list[Model]], merged: Output[Model]):
    """The MIL results of every encoder in one artifact."""
    from histotransfer.stages import adapter as a

    merged.metadata["files"] = len(a.call(a.merge, [p.path for p in parts], merged.path))


@component
def finetune_step(
    cohort: Input[Dataset],
    tiles: Input[Dataset],
    features: Input[Dataset],
    mil_results: Input[Model],
    extraction: dict,
    mil: dict,
    finetune: dict,
    evaluation: dict,
    finetuned: Output[Model],
    metrics: Output[Metrics],
):
    """Attention top-k fine-tuning of each `finetune.encoders` id in every fold, then MIL again."""
    from histotransfer.stages import adapter as a

    inputs = [cohort.path, tiles.path, features.path, mil_results.path]
    sections = {"extraction": extraction, "mil": mil, "finetune": finetune, "evaluation": evaluation}
    result = a.call(a.run_stage, "finetune", inputs, finetuned.path, sections=sections)
    finetuned.metadata["errors"] = result["errors"]
    for encoder, values in result["metrics"].items():
        for name, value in values.items():
            metrics.log_metric(f"{encoder}/{name}", value)


@component
def cka_step(
    cohort: Input[Dataset],
    tiles: Input[Dataset],
    finetuned: Input[Model],
    extraction: dict,
    finetune: dict,
    cka: dict,
    comparison: Output[Dataset],
):
    """Layer-by-layer CKA of each frozen encoder against its fine-tuned version."""
    from histotransfer.stages import adapter as a

    inputs = [cohort.path, tiles.path, finetuned.path]
    sections = {"extraction": extraction, "finetune": finetune, "cka": cka}
    comparison.metadata.update(a.call(a.run_stage, "cka", inputs, comparison.path, sections=sections))


@component
def export_step(
    tiles: Input[Dataset],
    mil_results: Input[Model],
    finetuned: Input[Model],
    export: dict,
    extraction: dict,
    bundle: Output[Model],
):
    """The study's best model as an ONNX bundle (encoder.onnx, aggregator.onnx, bundle.json)."""
    from histotransfer.stages import adapter as a

    inputs = [tiles.path, mil_results.path, finetuned.path]
    sections = {"export": export, "extraction": extraction}
    info = a.call(a.run_stage, "export", inputs, bundle.path, sections=sections)
    bundle.metadata.update(
        {"encoder": info["encoder"], "fold": info["fold"]}
        | {f"parity_{k}": v.max_rel for k, v in info["parity"].items()}
    )


@component
def report_step(
    tiles: Input[Dataset],
    mil_results: Input[Model],
    finetuned: Input[Model],
    comparison: Input[Dataset],
    bundle: Input[Model],
    report: Output[HTML],
    summary: Output[Markdown],
    lineage: Output[Markdown],
    report_dir: Output[Dataset],
    compared: Output[Metrics],
):
    """The study report: one self-contained HTML page for the KFP UI, its markdown, the lineage of every
    artifact (histotransfer verify), the folder, and each encoder's paired comparison with the best
    (``ENCODER/auc_diff_vs_best``, its CI, p and Holm's p: the numbers of the report's table)."""
    import json
    from pathlib import Path

    from histotransfer.report.html import COMPARISONS_JSON, compared_metrics, inline_images
    from histotransfer.stages import adapter as a

    inputs = [tiles.path, mil_results.path, finetuned.path, comparison.path, bundle.path]
    index = a.call(a.report_folder, inputs, report_dir.path)
    if (rows := index.parent / COMPARISONS_JSON).is_file():
        for encoder, numbers in compared_metrics(
            json.loads(rows.read_text(encoding="utf-8"))["rows"]
        ).items():
            for name, value in numbers.items():
                compared.log_metric(f"{encoder}/{name}", value)
    Path(report.path).write_text(inline_images(index), encoding="utf-8")
    Path(summary.path).write_text((index.parent / "summary.md").read_text(encoding="utf-8"), encoding="utf-8")
    Path(lineage.path).write_text((index.parent / "lineage.md").read_text(encoding="utf-8"), encoding="utf-8")


@component
def predict_step(bundle: Input[Model], slides: str, predictions: Output[Dataset], summary: Output[Markdown]):
    """Classify new slides (a slide, a gs:// URI or a manifest) with an ONNX bundle; no torch."""
    from pathlib import Path

    from histotransfer.stages import adapter as a

    result = a.call(a.classify, bundle.path, slides, predictions.path)
    predictions.metadata.update({k: v for k, v in result.items() if k != "predictions"})
    table = (Path(predictions.path) / "predictions.csv").read_text(encoding="utf-8").strip().splitlines()
    rows = ["| " + " | ".join(line.split(",")) + " |" for line in table]
    rows.insert(1, "|" + "---|" * len(table[0].split(",")))
    Path(summary.path).write_text("# Predictions\n\n" + "\n".join(rows) + "\n", encoding="utf-8")
