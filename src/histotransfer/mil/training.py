"""Training attention-MIL on one fold: one slide per step, Adam, features standardised by the fold's
training tiles, a few restarts, and the epoch kept by the configured selection rule.

The protocol and why each part is there: docs/adr/0010-mil-training.md (measured by
``benchmarks/bench_mil.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from histotransfer.core.config import MILConfig
from histotransfer.core.errors import TrainingError
from histotransfer.features.bags import BagStore
from histotransfer.mil.model import MILHead, build_head
from histotransfer.mil.splits import Fold


@dataclass
class FoldModel:
    fold: Fold
    model: MILHead  # takes raw features: the standardisation is folded into its first layer
    best_epoch: int
    history: list[dict[str, float | None]] = field(default_factory=list)  # of the kept restart
    restart: int = 0
    restarts: list[dict[str, float | None]] = field(default_factory=list)  # selection loss of each


def build_model(in_dim: int, n_classes: int, cfg: MILConfig) -> MILHead:
    return build_head(
        cfg.aggregator,
        in_dim,
        n_classes,
        hidden_dims=cfg.hidden_dims,
        attention_dim=cfg.attention_dim,
        dropout=cfg.dropout,
        patch_head=cfg.beta > 0,
    )


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the training slides); absent classes weigh 0."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature z-scoring, ``(x - mean) / scale``; features constant on the training tiles keep
    scale 1 (dividing by a zero spread would blow up any other value)."""

    mean: torch.Tensor  # (dim,)
    scale: torch.Tensor  # (dim,)

    @classmethod
    def fit(cls, bags: Sequence[torch.Tensor]) -> Standardizer:
        """Mean and standard deviation over every tile of ``bags``, accumulated in float64."""
        dim = bags[0].shape[1]
        total, total_sq, n = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
        for x in bags:  # (n_tiles, dim) each
            x64 = x.double()
            total += x64.sum(0)
            total_sq += (x64 * x64).sum(0)
            n += len(x)
        mean = total / n
        sd = (total_sq / n - mean * mean).clamp_min(0).sqrt()
        scale = torch.where(sd > 1e-6 * (1 + mean.abs()), sd, torch.ones_like(sd))
        return cls(mean.float(), scale.float())

    @classmethod
    def identity(cls, dim: int) -> Standardizer:
        return cls(torch.zeros(dim), torch.ones(dim))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale  # (n_tiles, dim)

    def fold_into(self, model: MILHead) -> MILHead:
        """``model`` changed in place to take raw features: W' = W / scale, b' = b - W' mean."""
        first = model.embed[0]
        with torch.no_grad():
            weight = first.weight.double() / self.scale.double()  # (h1, dim)
            first.bias.copy_((first.bias.double() - weight @ self.mean.double()).float())
            first.weight.copy_(weight.float())
        return model


def bag_loss(model: MILHead, x: torch.Tensor, y: int, slide_loss: nn.Module, beta: float) -> torch.Tensor:
    """Slide cross-entropy (mixed with the head's own loss where it has one: CLAM's instance loss),
    plus beta times the patch-level loss (every tile takes the slide label)."""
    out = model(x)
    target = torch.tensor([y])
    loss = slide_loss(out.logits[None], target)
    if (own := model.auxiliary_loss(out, y)) is not None:
        weight = model.slide_weight()
        loss = weight * loss + (1 - weight) * own
    if out.patch_logits is not None and beta > 0:
        patch_target = target.expand(len(x))  # (n_tiles,)
        loss = loss + beta * nn.functional.cross_entropy(out.patch_logits, patch_target)
    return loss


def _mean_loss(model, bags: dict[str, torch.Tensor], store: BagStore, slide_ids, loss_fn, beta) -> float:
    model.eval()
    with torch.no_grad():
        return float(
            np.mean([bag_loss(model, bags[s], store.label(s), loss_fn, beta).item() for s in slide_ids])
        )


def _seed(seed: int, fold: int, restart: int) -> int:
    """A distinct, reproducible seed per (study seed, fold, restart)."""
    return int(np.random.SeedSequence([seed, fold, restart]).generate_state(1)[0])


@dataclass
class _Run:
    """One initialisation trained for all epochs: its kept state and the loss that ranks it."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    selection_loss: float
    history: list[dict[str, float | None]]


def _train_once(
    bags: dict[str, torch.Tensor], store: BagStore, fold: Fold, *, n_classes, cfg: MILConfig, seed: int
) -> _Run:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(store.dim, n_classes, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(fold.train)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        if cfg.schedule == "cosine"
        else None
    )
    train_labels = [store.label(s) for s in fold.train]
    weight = class_weights(train_labels, n_classes) if cfg.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    by_val = cfg.selection == "val_loss"
    best_loss, best_epoch, best_state = math.inf, 0, None
    history: list[dict[str, float | None]] = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        for slide_id in rng.permutation(np.array(fold.train)):
            loss = bag_loss(model, bags[slide_id], store.label(slide_id), loss_fn, cfg.beta)
            if not torch.isfinite(loss) or loss.item() > cfg.max_loss:
                raise TrainingError(
                    f"fold {fold.index}, epoch {epoch}, slide {slide_id}: loss {loss.item():.4g} "
                    f"diverged (limit {cfg.max_loss:g}); lower mil.lr (now {cfg.lr:g}) or check the features"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
        val_loss = _mean_loss(model, bags, store, fold.val, loss_fn, cfg.beta) if fold.val else None
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
        if by_val:
            if not math.isfinite(val_loss):
                raise TrainingError(
                    f"fold {fold.index}, epoch {epoch}: validation loss is {val_loss}; check the validation "
                    f"slides' features ({', '.join(fold.val[:5])}) for NaN or inf, or use mil.selection: last"
                )
            if val_loss < best_loss:
                best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
    if not by_val:
        best_loss, best_epoch, best_state = history[-1]["train_loss"], cfg.epochs, model.state_dict()
    return _Run(best_state, best_epoch, best_loss, history)


def train_fold(store: BagStore, fold: Fold, *, n_classes: int, cfg: MILConfig) -> FoldModel:
    """Train ``cfg.restarts`` initialisations on ``fold.train``; keep the one (and its epoch) with the
    lowest selection loss: the validation loss (``selection: val_loss``) or the last epoch's training
    loss (``selection: last``). The test slides are never read."""
    if cfg.selection == "val_loss" and not fold.val:
        raise TrainingError(f"fold {fold.index} has no validation slides for mil.selection val_loss")
    raw = {s: store.features(s) for s in (*fold.train, *fold.val)}
    train_bags = [raw[s] for s in fold.train]
    scaler = Standardizer.fit(train_bags) if cfg.standardize else Standardizer.identity(store.dim)
    bags = {s: scaler(x) for s, x in raw.items()}  # (n_tiles, dim) each
    runs = [
        _train_once(bags, store, fold, n_classes=n_classes, cfg=cfg, seed=_seed(cfg.seed, fold.index, r))
        for r in range(cfg.restarts)
    ]
    kept = min(range(len(runs)), key=lambda r: runs[r].selection_loss)
    model = build_model(store.dim, n_classes, cfg)
    model.load_state_dict(runs[kept].state)
    scaler.fold_into(model).eval()
    summary = [
        {"restart": r, "selection_loss": run.selection_loss, "best_epoch": run.best_epoch}
        for r, run in enumerate(runs)
    ]
    return FoldModel(fold, model, runs[kept].best_epoch, runs[kept].history, kept, summary)


@dataclass(frozen=True)
class SlidePrediction:
    slide_id: str
    label: int
    fold: int
    probs: np.ndarray  # (n_classes,)
    attention: np.ndarray  # (n_tiles,)


def predict_slides(
    model: MILHead, store: BagStore, slide_ids: Sequence[str], fold: int
) -> list[SlidePrediction]:
    model.eval()
    out = []
    with torch.no_grad():
        for slide_id in slide_ids:
            result = model(store.features(slide_id))
            probs = torch.softmax(result.logits, dim=0).numpy()
            out.append(
                SlidePrediction(slide_id, store.label(slide_id), fold, probs, result.attention.numpy())
            )
    return out
