"""The CKA stage: layer-by-layer comparison of two encoders on the study's tiles."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotransfer.core.config import StudyConfig
from histotransfer.core.errors import ConfigError, FeaturesError
from histotransfer.io import lineage
from histotransfer.io.layout import StudyLayout
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.io.outputs import claim_output
from histotransfer.stages.common import tiled, tiles_folder
from histotransfer.stages.fanout import fan_out
from histotransfer.stages.models import build, engine

if TYPE_CHECKING:
    from histotransfer.features.encoders import Encoder

log = logging.getLogger(__name__)


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
    from histotransfer.core.encoder_ids import finetuned_id
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


def for_artifacts(layout: StudyLayout, config: StudyConfig) -> dict[str, Any]:
    """Orchestrators: frozen vs fold ``cka.fold``'s fine-tuned encoder for every fine-tuned encoder (an
    empty section when nothing was fine-tuned); the files written and the failures."""
    records = read_manifest(layout.manifest)
    done = fan_out(config.finetune.encoders, lambda e: cka(layout, config, records, e), what="cka").check()
    layout.cka.mkdir(exist_ok=True)
    return {"files": [p.name for p in done.results.values()], "errors": done.errors}
