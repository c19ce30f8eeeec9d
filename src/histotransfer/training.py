"""Training attention-MIL on one fold: one slide per step, Adam, model selection on validation slides."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from histotransfer.bags import BagStore
from histotransfer.config import MILConfig
from histotransfer.errors import TrainingError
from histotransfer.mil import AttentionMIL
from histotransfer.splits import Fold


@dataclass
class FoldModel:
    fold: Fold
    model: AttentionMIL
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def build_model(in_dim: int, n_classes: int, cfg: MILConfig) -> AttentionMIL:
    return AttentionMIL(
        in_dim,
        n_classes,
        hidden_dims=cfg.hidden_dims,
        attention_dim=cfg.attention_dim,
        attention=cfg.attention,
        dropout=cfg.dropout,
        patch_head=cfg.beta > 0,
    )


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the training slides); absent classes weigh 0."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def bag_loss(
    model: AttentionMIL, x: torch.Tensor, y: int, slide_loss: nn.Module, beta: float
) -> torch.Tensor:
    """Slide cross-entropy, plus beta times the patch-level loss (every tile takes the slide label)."""
    out = model(x)
    target = torch.tensor([y])
    loss = slide_loss(out.logits[None], target)
    if out.patch_logits is not None and beta > 0:
        patch_target = target.expand(len(x))  # (n_tiles,)
        loss = loss + beta * nn.functional.cross_entropy(out.patch_logits, patch_target)
    return loss


def _mean_loss(model, store: BagStore, slide_ids, loss_fn, beta: float) -> float:
    model.eval()
    with torch.no_grad():
        return float(
            np.mean(
                [bag_loss(model, store.features(s), store.label(s), loss_fn, beta).item() for s in slide_ids]
            )
        )


def train_fold(store: BagStore, fold: Fold, *, n_classes: int, cfg: MILConfig) -> FoldModel:
    """Train on ``fold.train``, keep the epoch with the lowest loss on ``fold.val``; never touch the test."""
    seed = cfg.seed * 1000 + fold.index
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(store.dim, n_classes, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_labels = [store.label(s) for s in fold.train]
    weight = class_weights(train_labels, n_classes) if cfg.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    best = (math.inf, -1, None)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for slide_id in rng.permutation(np.array(fold.train)):
            loss = bag_loss(model, store.features(slide_id), store.label(slide_id), loss_fn, cfg.beta)
            if not torch.isfinite(loss) or loss.item() > cfg.max_loss:
                raise TrainingError(
                    f"fold {fold.index}, epoch {epoch + 1}, slide {slide_id}: loss {loss.item():.4g} "
                    f"diverged (limit {cfg.max_loss:g}); lower mil.lr (now {cfg.lr:g}) or check the features"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        val_loss = _mean_loss(model, store, fold.val, loss_fn, cfg.beta)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
        if val_loss < best[0]:
            best = (val_loss, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return FoldModel(fold, model, best[1], history)


@dataclass(frozen=True)
class SlidePrediction:
    slide_id: str
    label: int
    fold: int
    probs: np.ndarray  # (n_classes,)
    attention: np.ndarray  # (n_tiles,)


def predict(
    model: AttentionMIL, store: BagStore, slide_ids: Sequence[str], fold: int
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
