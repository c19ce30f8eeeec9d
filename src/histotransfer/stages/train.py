"""The MIL stage: cross-validated attention-MIL on one encoder's features."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from histotransfer.core.config import StudyConfig
from histotransfer.core.errors import FeaturesError
from histotransfer.io import lineage
from histotransfer.io.layout import SUMMARY, MILLayout, StudyLayout
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.io.outputs import claim_output
from histotransfer.stages.common import going_on, tiled

if TYPE_CHECKING:
    from histotransfer.mil.crossval import LesionMasks
    from histotransfer.mil.results import MILResult
    from histotransfer.mil.splits import Fold

log = logging.getLogger(__name__)


def train(
    layout: StudyLayout,
    config: StudyConfig,
    records: Sequence[SlideRecord],
    encoder_id: str,
    *,
    folds: Sequence[Fold] | None = None,
    overwrite: bool = False,
) -> MILResult:
    """Cross-validated attention-MIL on one encoder's features: ``mil/{encoder_id}/``. ``folds``: the
    folds the fine-tuning stage fine-tuned in, whose per-fold features (``features/{id}+ft/fold{k}/``:
    fold k's slides encoded by fold k's encoder) are used on those very folds, less the slides that
    failed (new folds would put slides an encoder was trained on into its test set)."""
    from histotransfer.mil.crossval import train_mil

    tiles = layout.tiles if layout.has("tiles") else None
    folder = layout.features_dir(encoder_id)
    if (
        folds is None
        and folder.is_dir()
        and not any(folder.glob("*.h5"))
        and (inner := sorted(folder.glob("*/*.h5")))
    ):
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
    dirs = (
        {None: folder}
        if folds is None
        else {f.index: layout.features_dir(encoder_id, f.index) for f in folds}
    )
    usable = tiled(layout, records)
    for k, d in dirs.items():
        usable = going_on(
            usable, d / SUMMARY, f"extraction with {encoder_id}" + (f" fold {k}" if k is not None else "")
        )
    if records and not usable:
        raise FeaturesError(
            f"no slide has features for {encoder_id}: every one failed in tiling or extraction (see the "
            f"summary.csv in {tiles or 'the tiles folder'} and {layout.features_dir(encoder_id)})"
        )
    tiles_made = lineage.check_tiles(tiles, usable) if tiles is not None else None
    features = {
        k: lineage.check_features(d, usable, encoder_id=encoder_id, tiles=tiles_made) for k, d in dirs.items()
    }
    common = {
        "evaluation": config.evaluation,
        "tiles_dir": tiles,  # without: no heatmaps, no localisation
        "lesion_masks": lesion_masks(layout),
        "overwrite": overwrite,
        "feature_sets": features,
    }
    result = train_mil(
        usable,
        features_dir=folder if folds is None else dict(dirs),
        out_dir=layout.mil,
        mil=config.mil,
        folds=None if folds is None else [_less(f, {r.slide_id for r in usable}) for f in folds],
        **common,
    )
    if folds is None:  # mil.compare: the other heads on the same frozen features, folds and seeds
        place = MILLayout(result.out_dir)
        for kind in config.mil.compare:
            mil = config.mil.head(kind)
            train_mil(usable, features_dir=folder, out_dir=place.compared_root(kind), mil=mil, **common)
    return result


def _less(fold: Fold, kept: set[str]) -> Fold:
    """``fold`` with only the ``kept`` slides in each part."""
    from histotransfer.mil.splits import Fold

    return Fold(
        fold.index,
        tuple(s for s in fold.train if s in kept),
        tuple(s for s in fold.val if s in kept),
        tuple(s for s in fold.test if s in kept),
    )


def for_artifacts(layout: StudyLayout, config: StudyConfig, *, encoder: str) -> dict[str, Any]:
    """Orchestrators: MIL for one encoder; its metrics, pooled ROC and confusion matrix."""
    from histotransfer.mil.results import classification_summary

    result = train(layout, config, read_manifest(layout.manifest), encoder)
    return classification_summary(result.out_dir)


def lesion_masks(layout: StudyLayout) -> LesionMasks | None:
    """The sample cohort's lesion masks beside the manifest (localisation), if it has them."""
    from histotransfer.mil.crossval import LesionMasks

    return LesionMasks.beside(layout.manifest)
