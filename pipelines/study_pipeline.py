"""The `study` pipeline: cohort -> tiles and features sharded over slides (encoders in parallel) ->
cross-validated MIL per encoder -> fine-tuning and CKA -> ONNX export -> report.

Its parameters mirror params.yaml: one dict per config section (defaults: the committed params.yaml),
plus `manifest` ("": the sample cohort) and `shards` (slide-parallel width of tiling/extraction).
"""

from kfp import dsl
from kfp.dsl import HTML

from components import (
    cka_step,
    export_step,
    extract_shard,
    finetune_step,
    list_encoders,
    make_cohort,
    merge_models,
    merge_shards,
    plan_extraction,
    plan_tiles,
    report_step,
    tile_shard,
    train_mil,
)
from histotransfer import __version__
from pipelines.options import PipelineOptions, default_parameters

NAME = "histotransfer-study"


def build(options: PipelineOptions | None = None):
    """The study pipeline function for these compile-time options."""
    options = options or PipelineOptions()
    d = default_parameters()

    @dsl.pipeline(name=NAME, description=f"HistoTransfer study, histotransfer {__version__}")
    def study(
        manifest: str = d["manifest"],
        shards: int = 4,
        sample_data: dict = d["sample_data"],
        tiling: dict = d["tiling"],
        extraction: dict = d["extraction"],
        mil: dict = d["mil"],
        finetune: dict = d["finetune"],
        cka: dict = d["cka"],
        export: dict = d["export"],
        evaluation: dict = d["evaluation"],
    ) -> HTML:
        step = options.step
        # a user's manifest is read by name: never cached, it may have changed
        cohort = step(make_cohort(manifest=manifest, sample_data=sample_data), cache=False)
        cohort_ds = cohort.outputs["cohort"]
        tile_plan = step(plan_tiles(cohort=cohort_ds, shards=shards))
        with dsl.ParallelFor(tile_plan.output, name="tile-shards") as item:
            tiled = step(tile_shard(cohort=cohort_ds, item=item, tiling=tiling))
        tiles = step(merge_shards(parts=dsl.Collected(tiled.outputs["tiles"]))).set_display_name(
            "merge-tiles"
        )
        tiles_ds = tiles.outputs["merged"]
        extract_plan = step(plan_extraction(cohort=cohort_ds, shards=shards, extraction=extraction))
        with dsl.ParallelFor(extract_plan.output, name="extract-shards") as item:
            extracted = step(
                extract_shard(cohort=cohort_ds, tiles=tiles_ds, item=item, extraction=extraction), gpu=True
            )
        features = step(merge_shards(parts=dsl.Collected(extracted.outputs["features"])))
        features.set_display_name("merge-features")
        features_ds = features.outputs["merged"]
        encoders = step(list_encoders(extraction=extraction))
        with dsl.ParallelFor(encoders.output, name="encoders") as encoder:
            trained = step(
                train_mil(
                    cohort=cohort_ds,
                    tiles=tiles_ds,
                    features=features_ds,
                    encoder=encoder,
                    mil=mil,
                    evaluation=evaluation,
                )
            )
        mils = step(merge_models(parts=dsl.Collected(trained.outputs["model"]))).set_display_name("merge-mil")
        mil_results = mils.outputs["merged"]
        tuned = step(
            finetune_step(
                cohort=cohort_ds,
                tiles=tiles_ds,
                features=features_ds,
                mil_results=mil_results,
                extraction=extraction,
                mil=mil,
                finetune=finetune,
                evaluation=evaluation,
            ),
            gpu=True,
        )
        compared = step(
            cka_step(
                cohort=cohort_ds,
                tiles=tiles_ds,
                finetuned=tuned.outputs["finetuned"],
                extraction=extraction,
                finetune=finetune,
                cka=cka,
            ),
            gpu=True,
        )
        bundle = step(
            export_step(
                tiles=tiles_ds,
                mil_results=mil_results,
                finetuned=tuned.outputs["finetuned"],
                export=export,
                extraction=extraction,
            )
        )
        report = step(
            report_step(
                tiles=tiles_ds,
                mil_results=mil_results,
                finetuned=tuned.outputs["finetuned"],
                comparison=compared.outputs["comparison"],
                bundle=bundle.outputs["bundle"],
            )
        )
        return report.outputs["report"]

    return study
