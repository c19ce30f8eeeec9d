"""Exporting a study's model as an ONNX bundle (see histotransfer.deploy.bundle for the format).

A cross-validated study has one MIL head per fold (and, for fine-tuned encoders, one encoder per
fold). The bundle takes one fold: by default the fold whose head reached the lowest validation loss
(the lowest training loss when the folds had no validation slides), with that fold's encoder when the
encoder is fine-tuned. Its tiling settings are the ones the study's tiles were made with, read from the
tiles files, so new slides are tiled exactly like the training ones.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from histotransfer import __version__
from histotransfer.core.config import TilingConfig
from histotransfer.core.encoder_ids import frozen_id, parse_encoder_id
from histotransfer.core.errors import BundleError, ExportError
from histotransfer.core.onnx_runtime import TOLERANCE
from histotransfer.deploy.bundle import (
    AGGREGATOR_FILE,
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    ENCODER_FILE,
    AggregatorInfo,
    BundleSpec,
    EncoderInfo,
    read_spec,
    spec_json,
)
from histotransfer.deploy.onnx_export import aggregator_parity, export_aggregator
from histotransfer.features.encoders import Encoder, build_encoder
from histotransfer.features.onnx_encoder import OPSET, encoder_parity, export_encoder
from histotransfer.io import lineage
from histotransfer.io.atomic import atomic_dir
from histotransfer.io.layout import MILLayout
from histotransfer.io.provenance import CONFIG_ATTR, config_hash, read_json, sha256_file
from histotransfer.mil.model import MILHead
from histotransfer.mil.model import load_head as head_from_state
from histotransfer.mil.results import MILResult
from histotransfer.wsi.slides import local_slide_path, open_slide
from histotransfer.wsi.tiling import load_tiles, read_tile, tiling_hash

log = logging.getLogger(__name__)
PARITY_BAG_SIZES = (1, 10_000)  # the extremes a deployed head meets; a real bag is added when tiles exist


@dataclass(frozen=True)
class ExportResult:
    path: Path
    spec: BundleSpec
    reused: bool


def best_result(results: list[MILResult]) -> MILResult:
    """The study's best model, ranked as the report ranks it (its first row)."""
    if not results:
        raise ExportError("no MIL results to export from")
    return min(results, key=MILResult.rank_key)


@dataclass(frozen=True)
class FoldLoss:
    """The losses of a fold's kept MIL head: on its validation slides (None without them) and on its
    training slides in the kept epoch."""

    val_loss: float | None
    train_loss: float

    def rank(self) -> float:
        return self.val_loss if self.val_loss is not None else self.train_loss


def choose_fold(mil_dir: Path) -> tuple[int, FoldLoss]:
    """The fold whose kept head has the lowest validation loss (or, when the folds had no validation
    slides, the lowest training loss), with its losses."""
    folds = MILLayout(Path(mil_dir)).folds()
    if not folds:
        raise ExportError(f"{mil_dir} has no fold*/history.json: run `histotransfer train` first")
    losses = {fold: fold_loss(mil_dir, fold) for fold in folds}
    fold = min(folds, key=lambda k: (losses[k].rank(), k))
    return fold, losses[fold]


def fold_loss(mil_dir: Path, fold: int) -> FoldLoss:
    """Fold ``fold``'s losses in its kept epoch, from its history.json."""
    history_file = MILLayout(Path(mil_dir)).fold_history(fold)
    if not history_file.is_file():
        raise ExportError(f"{history_file} not found: fold {fold} is not a fold of {mil_dir}")
    redo = f"train {Path(mil_dir).name} again (histotransfer train ... --overwrite)"
    history = read_json(history_file, redo=redo, keys=("history", "best_epoch"))
    try:
        kept = history["history"][history["best_epoch"] - 1]
    except (IndexError, KeyError, TypeError) as exc:
        raise ExportError(
            f"{history_file}: no kept epoch {history.get('best_epoch')!r} ({exc}): {redo}"
        ) from exc
    return FoldLoss(kept["val_loss"], kept["train_loss"])


def finished_result(mil_dir: Path) -> MILResult:
    """The finished MIL result in ``mil_dir``; an ExportError when there is none."""
    mil = MILLayout(Path(mil_dir))
    if not mil.metrics.is_file():
        raise ExportError(
            f"{mil.dir} has no metrics.json: not a finished MIL result (see `histotransfer train`)"
        )
    return MILResult.load(mil.dir)


def study_tiling(tiles_dir: Path) -> TilingConfig:
    """The tiling settings the study's tiles files record (all files must agree)."""
    seen: dict[str, TilingConfig] = {}
    for path in sorted(Path(tiles_dir).glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                recorded = json.loads(str(f.attrs[CONFIG_ATTR]))["tiling"]
            seen[json.dumps(recorded, sort_keys=True)] = TilingConfig.model_validate(recorded)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ExportError(
                f"{path}: not a tiles file of histotransfer's ({exc}); give --tiles the study's tiles folder"
            ) from exc
    if not seen:
        raise ExportError(f"no tiles files in {tiles_dir}: the bundle needs the study's tiling settings")
    if len(seen) > 1:
        raise ExportError(f"the tiles files in {tiles_dir} were made with {len(seen)} different settings")
    return next(iter(seen.values()))


def probe_tiles(tiles_dir: Path, n: int = 8) -> np.ndarray | None:
    """Up to ``n`` real tiles (n, 3, p, p) uint8 of the first readable slide of the study, or None."""
    for path in sorted(Path(tiles_dir).glob("*.h5")):
        tiles = load_tiles(path)
        try:
            with open_slide(local_slide_path(tiles.slide_path)) as slide:
                picks = np.linspace(0, len(tiles.coords) - 1, min(n, len(tiles.coords))).astype(int)
                return np.stack([read_tile(slide, tiles, int(i)) for i in picks]).transpose(0, 3, 1, 2)
        except Exception as exc:  # a moved or unreadable slide: parity then uses the random probes
            log.info("no real probe tiles from %s: %s", path, exc)
    return None


def load_head(mil_dir: Path, fold: int) -> MILHead:
    path = MILLayout(Path(mil_dir)).fold_model(fold)
    if not path.is_file():
        raise ExportError(f"{path} not found: fold {fold} has no MIL head")
    try:
        return head_from_state(torch.load(path, weights_only=True, map_location="cpu"))
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"{path}: not a usable MIL head ({exc})") from exc


def export_study_model(
    mil_dir: Path,
    *,
    out: Path,
    tiles_dir: Path,
    weights: str | Path | None = None,
    fold: int | None = None,
    fp16: bool = False,
    opset: int = OPSET,
    overwrite: bool = False,
    expect_encoder: str | None = None,
) -> ExportResult:
    """Export the MIL result in ``mil_dir`` (one fold's head and its encoder) as a bundle at ``out``.

    The encoder is built from the result's id and ``weights`` (for a fine-tuned id: fold ``fold``'s
    fine-tuned encoder file, which histotransfer.stages.export finds). ``tiles_dir``:
    the study's tiles, whose recorded settings the bundle keeps. A bundle already at ``out`` made from
    the same sources and settings is reused.
    """
    mil_dir, out = Path(mil_dir), Path(out)
    result = finished_result(mil_dir)
    encoder_id = result.encoder_id
    if expect_encoder is not None and str(parse_encoder_id(expect_encoder)) != encoder_id:
        raise ExportError(f"{mil_dir} is a MIL result for {encoder_id}, not for {expect_encoder}")
    if fold is None:
        fold, losses = choose_fold(mil_dir)
    else:
        losses = fold_loss(mil_dir, fold)
    head_file = MILLayout(mil_dir).fold_model(fold)
    if not head_file.is_file():
        raise ExportError(
            f"{head_file} not found: fold {fold} of {mil_dir} has no MIL head (rerun `histotransfer "
            "train` for this encoder with --overwrite, or export another fold with --fold)"
        )
    tiling = study_tiling(tiles_dir)
    if frozen_id(encoder_id) is not None and weights is None:
        raise ExportError(f"{encoder_id} is fine-tuned per fold: give fold {fold}'s encoder file")
    encoder = build_encoder(encoder_id, weights=weights)
    made_from = result.metrics.get("lineage")
    lineage.check_mil(
        mil_dir,
        made_from,
        folds=[fold],
        weights=(encoder.weights_sha256, encoder.weights_source),
        tiling=tiling_hash(tiling),
        weights_fix="give --weights the checkpoint its features were extracted with (as given to extract), "
        "or leave --weights out to use the config's",
    )
    precision = "fp16" if fp16 else "fp32"
    sources = {
        "encoder": encoder.weights_sha256,
        "head": sha256_file(head_file),
        "tiling": tiling.model_dump(mode="json"),
        "precision": precision,
        "opset": opset,
        "classes": result.metrics["classes"],
        "version": __version__,
    }
    expected = config_hash(sources)
    if not overwrite and _current(out, expected):
        return ExportResult(out, read_spec(out), reused=True)
    head = load_head(mil_dir, fold)
    spec = write_bundle(
        out,
        encoder=encoder,
        head=head,
        classes=result.metrics["classes"],
        tiling=tiling,
        aggregator=AggregatorInfo(
            mil_dir=str(mil_dir),
            fold=fold,
            val_loss=losses.val_loss,
            train_loss=losses.train_loss,
            kind=head.kind,
        ),
        probes=probe_tiles(tiles_dir),
        precision=precision,
        opset=opset,
        source_hash=expected,
        made_from={
            "kind": "bundle",
            "mil": {
                "dir": str(mil_dir),
                "encoder_id": encoder_id,
                "fold": fold,
                "head": sources["head"],
                "features": lineage.of_fold(made_from["features"], fold),
                "cohort": made_from["cohort"],
            },
            "encoder": {"id": str(encoder.id), **_weights(encoder)},
            "tiling": tiling_hash(tiling),
        },
    )
    return ExportResult(out, spec, reused=False)


def _weights(encoder: Encoder) -> dict[str, str]:
    return {"weights_sha256": encoder.weights_sha256, "weights_source": encoder.weights_source}


def _current(out: Path, expected: str) -> bool:
    try:
        return read_spec(out).source_hash == expected
    except BundleError:
        return False


def write_bundle(
    out: Path,
    *,
    encoder: Encoder,
    head: MILHead,
    classes: list[str],
    tiling: TilingConfig,
    aggregator: AggregatorInfo,
    probes: np.ndarray | None,
    precision: str,
    opset: int,
    source_hash: str,
    made_from: dict | None = None,
) -> BundleSpec:
    """Export both graphs, measure parity, write bundle.json last; all or nothing at ``out``.
    ``made_from``: the bundle's lineage (none for a bundle made outside a study)."""
    p = tiling.patch_size_px
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 3, p, p), dtype=np.uint8) for n in (1, 5)]
    if probes is not None:
        batches.append(np.ascontiguousarray(probes))
    with torch.inference_mode():
        real = encoder.module.cpu().eval()(torch.from_numpy(batches[-1])).numpy()  # (b, dim)
    scale = float(np.abs(real).mean()) or 1.0
    bags = [
        np.abs(rng.standard_normal((n, encoder.dim))).astype(np.float32) * scale for n in PARITY_BAG_SIZES
    ]
    bags.append(real.astype(np.float32))
    with atomic_dir(out) as stage:
        export_encoder(encoder, stage / ENCODER_FILE, tile_px=p, opset=opset, fp16=precision == "fp16")
        enc_parity = encoder_parity(encoder, stage / ENCODER_FILE, batches, tolerance=TOLERANCE[precision])
        export_aggregator(head, stage / AGGREGATOR_FILE, in_dim=encoder.dim, opset=opset)
        agg_parity = aggregator_parity(head, stage / AGGREGATOR_FILE, bags, tolerance=TOLERANCE["fp32"])
        spec = BundleSpec(
            format=BUNDLE_FORMAT,
            format_version=BUNDLE_VERSION,
            name=out.name,
            histotransfer_version=__version__,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            opset=opset,
            classes=classes,
            tiling=tiling,
            encoder=EncoderInfo(
                id=str(encoder.id),
                dim=encoder.dim,
                weights_source=encoder.weights_source,
                weights_sha256=encoder.weights_sha256,
                mean=tuple(encoder.mean),
                std=tuple(encoder.std),
                precision=precision,
            ),
            aggregator=aggregator,
            parity={"encoder": enc_parity, "aggregator": agg_parity},
            files={name: sha256_file(stage / name) for name in (ENCODER_FILE, AGGREGATOR_FILE)},
            source_hash=source_hash,
            lineage=made_from or {},
            integrity="",
        )
        text = spec_json(spec)
        (stage / BUNDLE_FILE).write_text(text, encoding="utf-8")
        spec = spec.model_copy(update={"integrity": json.loads(text)["integrity"]})
    log.info(
        "bundle %s: %s with the %s MIL head of fold %d", out, encoder.id, aggregator.kind, aggregator.fold
    )
    return spec
