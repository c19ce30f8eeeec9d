"""Attention top-k fine-tuning (the paper's answer to frozen ImageNet features), inside each fold.

For fold k: the frozen-feature MIL model of fold k scores the tiles of the fold's training and
validation slides; the k highest-attention tiles of each (or k random ones, the baseline) form small
bags; encoder + attention head, the head initialised from the MIL head, train end to end on the
training bags, read from the WSI once and kept decoded, with BatchNorm kept in eval mode; the epoch with the
lowest validation loss is kept (the last one when the fold has no validation slides, as with MIL's
default ``selection: last``). Test slides of the fold are never read. Outputs per fold under
``finetune/{encoder_id}/fold{k}/``: ``encoder.pt`` (a state_dict with timm names: it loads as the
encoder ``{encoder_id}+ft``), ``head.pt``, ``selection.h5`` (coords and scores per slide),
``history.json``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from histotransfer import __version__
from histotransfer.core.config import FinetuneConfig
from histotransfer.core.cpus import available_cpus
from histotransfer.features.bags import BagStore
from histotransfer.features.encoders import Encoder, leading_parameters
from histotransfer.features.weights import state_sha256
from histotransfer.io import lineage
from histotransfer.io.atomic import atomic_dir
from histotransfer.io.layout import FinetuneFoldLayout
from histotransfer.io.marks import MARK_KEY, mark
from histotransfer.io.provenance import sealed_json
from histotransfer.mil.model import MILHead
from histotransfer.mil.training import TrainingError, class_weights
from histotransfer.wsi.batches import tile_batches
from histotransfer.wsi.slides import local_slide_path
from histotransfer.wsi.tiling import TileSet

log = logging.getLogger(__name__)


def select_tiles(
    attention: np.ndarray, k: int, *, mode: str = "attention", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices of the k tiles to fine-tune on: highest attention first, or k at random (baseline)."""
    k = min(k, len(attention))
    if mode == "attention":
        return np.argsort(-attention, kind="stable")[:k]
    if mode == "random":
        return np.sort((rng or np.random.default_rng(0)).choice(len(attention), size=k, replace=False))
    raise ValueError(f"selection must be attention or random, got {mode!r}")


@dataclass(frozen=True)
class Bag:
    """The selected tiles of one slide."""

    slide_id: str
    slide_path: str
    tiles: TileSet  # only the selected tiles
    label: int
    scores: np.ndarray  # attention of the selected tiles under the fold's frozen MIL model


def make_bags(
    slide_ids: Sequence[str],
    *,
    store: BagStore,
    head: MILHead,
    tiles: dict[str, TileSet],
    paths: dict[str, str],
    k: int,
    mode: str,
    seed: int,
) -> list[Bag]:
    """Score every tile of the given slides with the frozen MIL head and keep k per slide."""
    rng = np.random.default_rng(seed)
    bags = []
    head.eval()
    with torch.no_grad():
        for slide_id in slide_ids:
            attention = head(store.features(slide_id)).attention.numpy()  # (n_tiles,)
            idx = select_tiles(attention, k, mode=mode, rng=rng)
            subset = tiles[slide_id].subset(idx)
            bags.append(Bag(slide_id, paths[slide_id], subset, store.label(slide_id), attention[idx]))
    return bags


def save_selection(path: Path, bags: Sequence[Bag], *, mode: str) -> None:
    with h5py.File(path, "w") as f:
        f.attrs.update({MARK_KEY: __version__, "selection": mode})
        for bag in bags:
            group = f.create_group(bag.slide_id)
            group.create_dataset("coords", data=bag.tiles.coords)  # (k, 2) level-0 x, y
            group.create_dataset("scores", data=bag.scores.astype(np.float32))  # (k,)
            group.attrs["label"] = bag.label


def read_bag(bag: Bag, *, readers: int) -> torch.Tensor:
    """The bag's tiles (k, 3, p, p) uint8, read from its slide on ``readers`` threads."""
    batches = tile_batches(
        local_slide_path(bag.slide_path), bag.tiles, batch_size=len(bag.tiles.coords), readers=readers
    )
    return torch.from_numpy(np.concatenate(list(batches)))


class BagDataset(Dataset):
    """One item per slide: its selected tiles (k, 3, p, p) uint8, optionally flipped and rotated.

    The tiles are read from the slides once, when the dataset is made, and kept decoded for every
    epoch (k x slides tiles: 64 x 200 slides of 224 px is 1.9 GB); augmentation draws a rotation and
    a flip per tile and applies them to the whole bag at once. Tiles that would take more than a
    quarter of the machine's memory are read again in every epoch instead (the log says so).
    """

    def __init__(self, bags: Sequence[Bag], *, augment: bool, seed: int, readers: int | None = None):
        self.bags = list(bags)
        self.readers = readers or available_cpus()
        started = time.perf_counter()
        need = sum(3 * b.tiles.patch_size_px**2 * len(b.tiles.coords) for b in self.bags)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.tiles: list[torch.Tensor] | None = None
        if need <= memory / 4:
            bar = tqdm(self.bags, desc="read top-k tiles", unit="slide", leave=False, dynamic_ncols=True)
            self.tiles = [read_bag(b, readers=self.readers) for b in bar]
        else:
            log.warning(
                "the top-k tiles need %.1f GiB, more than a quarter of this machine's memory: "
                "they are read from the slides in every epoch",
                need / 2**30,
            )
        self.read_s = time.perf_counter() - started
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    @property
    def n_tiles(self) -> int:
        return sum(len(b.tiles.coords) for b in self.bags)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.tiles) if self.tiles is not None else 0

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.tiles is not None:
            tiles = self.tiles[index]  # (k, 3, p, p)
        else:
            tiles = read_bag(self.bags[index], readers=self.readers)
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
            turns = torch.randint(4, (len(tiles),), generator=g)
            flips = torch.rand(len(tiles), generator=g) < 0.5
            tiles = tiles.clone()
            for k in (1, 2, 3):
                tiles[turns == k] = torch.rot90(tiles[turns == k], k, dims=(2, 3))
            tiles[flips] = tiles[flips].flip(3)
        return tiles, self.bags[index].label


BIG_ENCODER = 300_000_000  # parameters from which fine-tuning recomputes activations (ViT-L and up)


class EncoderWithHead(nn.Module):
    """Encoder and attention head trained end to end; BatchNorm layers always in eval mode (their
    running statistics stay the pretrained ones), LayerNorm in train mode like every other layer (it
    keeps no statistics: it normalises each token by itself in both modes)."""

    def __init__(self, encoder: nn.Module, head: MILHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @classmethod
    def start(cls, encoder: Encoder, head: MILHead) -> EncoderWithHead:
        """Copies of the encoder and of the fold's trained MIL head: the originals stay untouched."""
        return cls(copy.deepcopy(encoder.module), copy.deepcopy(head))

    def train(self, mode: bool = True) -> EncoderWithHead:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # running statistics stay the pretrained ones; affine weights still train
        return self

    def forward(self, tiles: torch.Tensor):  # (k, 3, p, p) uint8
        return self.head(self.encoder(tiles))


@dataclass
class FinetuneResult:
    model: EncoderWithHead
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    read: dict[str, float] = field(default_factory=dict)  # the top-k tiles read once: count, s, MiB


def finetune(
    encoder: Encoder,
    head: MILHead,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    *,
    n_classes: int,
    cfg: FinetuneConfig,
    device: torch.device,
    readers: int | None = None,
) -> FinetuneResult:
    """Train encoder + head on the training bags; keep the epoch with the lowest validation loss, or
    the last epoch when there are no validation bags. The bags' tiles are read once (``readers``
    threads, default one per CPU) and kept decoded; each epoch's history has its tiles/s."""
    torch.manual_seed(cfg.seed)
    model = EncoderWithHead.start(encoder, head).to(device)
    for parameter in leading_parameters(model.encoder.model, encoder.id.arch, cfg.freeze_blocks):
        parameter.requires_grad_(False)
    big = sum(p.numel() for p in model.encoder.parameters()) >= BIG_ENCODER
    model.encoder.grad_checkpointing = big if cfg.grad_checkpointing is None else cfg.grad_checkpointing
    groups = [
        {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.head_lr or cfg.lr},
    ]
    optimizer = torch.optim.Adam(groups)
    weight = class_weights([b.label for b in train_bags], n_classes) if cfg.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    train_data = BagDataset(train_bags, augment=cfg.augment, seed=cfg.seed, readers=readers)
    val_data = BagDataset(val_bags, augment=False, seed=cfg.seed, readers=readers)
    read = {
        "tiles": train_data.n_tiles + val_data.n_tiles,
        "seconds": round(train_data.read_s + val_data.read_s, 3),
        "mib": round((train_data.nbytes + val_data.nbytes) / 2**20, 1),
    }

    def loader(data: BagDataset, shuffle: bool, epoch: int) -> DataLoader:
        data.epoch = epoch
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        return DataLoader(data, batch_size=None, shuffle=shuffle, generator=g, num_workers=0)  # in memory

    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history, stale = [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        started = time.perf_counter()
        optimizer.zero_grad()
        for step, (tiles, label) in enumerate(loader(train_data, True, epoch), start=1):
            with autocast():
                out = model(tiles.to(device))
            loss = loss_fn(out.logits.float()[None], torch.tensor([label], device=device))
            if not torch.isfinite(loss) or loss.item() > cfg.max_loss:
                raise TrainingError(
                    f"fine-tuning epoch {epoch}: loss {loss.item():.4g} diverged; lower finetune.lr"
                )
            (loss / cfg.accumulate).backward()
            losses.append(loss.item())
            if step % cfg.accumulate == 0 or step == len(train_data):
                optimizer.step()
                optimizer.zero_grad()
        speed = round(train_data.n_tiles / (time.perf_counter() - started), 1)  # forward + backward
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses)), "tiles_per_s": speed}
        if not val_bags:  # no validation slides (MIL's selection: last): the last epoch is kept
            history.append(entry | {"val_loss": None})
            best = (math.inf, epoch, None)
            continue
        val_loss = evaluate_loss(model, val_data, loss_fn, device, autocast, loader(val_data, False, 0))
        history.append(entry | {"val_loss": val_loss})
        if val_loss < best[0]:
            best, stale = (val_loss, epoch, copy.deepcopy(model.state_dict())), 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return FinetuneResult(model, best[1], history, read)


def evaluate_loss(model, data, loss_fn, device, autocast, batches) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for tiles, label in batches:
            with autocast():
                out = model(tiles.to(device))
            losses.append(loss_fn(out.logits.float()[None], torch.tensor([label], device=device)).item())
    return float(np.mean(losses)) if losses else math.inf


def save_finetuned(
    out: FinetuneFoldLayout,
    result: FinetuneResult,
    bags: Sequence[Bag],
    fold_parts: dict[str, Any],
    cfg: FinetuneConfig,
    config_hash: str,
    made_from: Callable[[str], dict[str, Any]],
) -> None:
    """The fold's folder, whole or not at all: encoder.pt (timm names of the cut network), head.pt,
    selection.h5 (the tiles each bag was given) and history.json, which records the files' sha256 and
    the lineage ``made_from(weights sha256 of the fine-tuned encoder)`` returns."""
    with atomic_dir(out.dir) as stage:
        staged = FinetuneFoldLayout(stage)
        encoder_state = result.model.encoder.model
        torch.save({k: v.cpu() for k, v in encoder_state.state_dict().items()}, staged.encoder)
        torch.save({k: v.cpu() for k, v in result.model.head.state_dict().items()}, staged.head)
        save_selection(staged.selection, bags, mode=cfg.selection)
        summary = {"config_hash": config_hash, "best_epoch": result.best_epoch, "history": result.history}
        summary |= {"tiles_read_once": result.read}
        summary |= {"finetune": cfg.model_dump(mode="json"), **fold_parts}
        names = [p.name for p in (staged.encoder, staged.head, staged.selection)]
        summary |= {
            "files": lineage.files_record(stage, names),
            "lineage": made_from(state_sha256(encoder_state)),
        }
        staged.history.write_text(sealed_json(mark(summary)), encoding="utf-8")
