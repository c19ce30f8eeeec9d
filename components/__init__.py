"""KFP v2 components: thin wrappers whose bodies import histotransfer and call
histotransfer.stages.adapter. All run in components.image.IMAGE and install nothing at run time."""

from components.image import IMAGE
from components.steps import (
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
    predict_step,
    report_step,
    tile_shard,
    train_mil,
)

__all__ = [
    "IMAGE",
    "cka_step",
    "export_step",
    "extract_shard",
    "finetune_step",
    "list_encoders",
    "make_cohort",
    "merge_models",
    "merge_shards",
    "plan_extraction",
    "plan_tiles",
    "predict_step",
    "report_step",
    "tile_shard",
    "train_mil",
]
