"""MIL heads ("aggregators"): one bag (a slide's tiles) in, slide logits and a score per tile out.

Every head shares the paper's tile embedding, so that heads differ only in how they pool:

features (n_tiles, D) -> Linear(D, 256) -> ReLU -> Linear(256, 64) -> ReLU -> h (n_tiles, 64)

abmil     the paper's attention: Linear(64, 32) -> Tanh -> Linear(32, 1), softmax over the tiles,
          Linear(64, n_classes) on sum_i a_i h_i
gated     Ilse et al.'s gated attention: tanh(V h) * sigmoid(U h) -> Linear(32, 1), pooled as abmil
clam_sb   CLAM single-branch (Lu et al. 2021) as CLAM runs it without `subtyping`: gated attention,
          plus an instance classifier per class, the slide's class's trained on the slide's top-k
          attended tiles (in class) and bottom-k (not); the other classes' classifiers are not
          trained (CLAM's subtyping mode would train them on the top-k as out of class). The loss is
          0.7 slide + 0.3 instance (CLAM's defaults: k = 8, cross-entropy; k shrinks to half of a
          smaller bag, where CLAM would fail), also for choosing restarts and epochs (CLAM's early
          stopping reads the slide loss only)
transmil  TransMIL (Shao et al. 2021): a class token and h through two pre-norm self-attention layers,
          the PPEG (depthwise 7/5/3 convolutions over the tokens laid out on a square, padded by
          repeating the first tokens) after the first; the classifier reads the class token. Exact
          attention (scaled_dot_product_attention) instead of the Nystrom approximation, so without
          its residual convolution over the values and its attention dropout; 4 heads of 16 (the
          64-wide shared embedding; the paper: 8 of 64 on 512) and a class token drawn with sd 0.02
mean      Linear(64, n_classes) on the mean of h (the pooling baseline)
max       Linear(64, n_classes) on each tile's h; the slide's logits are its top tile's (CLAM's MIL
          baseline): the tile most for class 1 of two, the most confident tile of more

``attention`` is a softmax over one score per tile: the attention itself, the class token's attention
to each tile (transmil, last layer, mean over heads), or, for the pooling baselines, a monotone
stand-in that heatmaps, localisation and top-k selection rank by: each tile's logit margin for the
class the slide points to (mean: class 1 of two, else the slide's argmax) or the rule that picks the
top tile (max).
An optional patch head (Linear(64, n_classes) on h) serves the patch-level auxiliary loss.

A head is rebuilt from its ``state_dict`` alone (:func:`load_head`): sizes come from the shapes and the
kind from the layer names, which differ between kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from histotransfer.core.config import AGGREGATORS

ATTENTION_KINDS = ("paper", "gated")  # AttentionMIL's own argument
CLAM_K, CLAM_BAG_WEIGHT = 8, 0.7  # CLAM's k_sample and bag_weight defaults
TRANSMIL_HEADS = 4


@dataclass(frozen=True)
class MILOutput:
    logits: torch.Tensor  # (n_classes,)
    attention: torch.Tensor  # (n_tiles,), sums to 1
    patch_logits: torch.Tensor | None  # (n_tiles, n_classes) when the patch head is on
    tiles: torch.Tensor | None = None  # (n_tiles, h2): the embedded tiles (auxiliary losses)


class MILHead(nn.Module):
    """The shared embedding and patch head; a subclass says how tiles pool (:meth:`pool`)."""

    kind: ClassVar[str]
    marker: ClassVar[str]  # a parameter name only this kind has (load_head tells kinds apart by it)

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dims: tuple[int, int] = (256, 64),
        dropout: float = 0.0,
        patch_head: bool = False,
    ):
        super().__init__()
        h1, h2 = hidden_dims
        self.n_classes = n_classes
        self.embed = nn.Sequential(  # embed[0] is where the standardisation is folded in
            nn.Linear(in_dim, h1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.patch_classifier = nn.Linear(h2, n_classes) if patch_head else None

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded tiles (n_tiles, h2) -> slide logits (n_classes,), tile scores (n_tiles,)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> MILOutput:
        h = self.embed(features)  # (n_tiles, h2)
        logits, scores = self.pool(h)
        patch = self.patch_classifier(h) if self.patch_classifier is not None else None
        return MILOutput(logits, torch.softmax(scores, dim=0), patch, h)

    def auxiliary_loss(self, out: MILOutput, label: int) -> torch.Tensor | None:
        """A head's own training loss beside the slide's (CLAM's instance loss); None: none."""
        return None

    def slide_weight(self) -> float:
        """The slide loss's weight where there is an auxiliary loss (the rest is the auxiliary's)."""
        return 1.0


class AttentionMIL(MILHead):
    """The paper's attention pooling (``attention="paper"``) or Ilse et al.'s gated attention."""

    kind = "abmil"
    marker = "attention_w.weight"

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dims: tuple[int, int] = (256, 64),
        attention_dim: int = 32,
        attention: str = "paper",
        dropout: float = 0.0,
        patch_head: bool = False,
    ):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        super().__init__(in_dim, n_classes, hidden_dims=hidden_dims, dropout=dropout, patch_head=patch_head)
        h2 = hidden_dims[1]
        self.gated = attention == "gated"
        self.attention_v = nn.Sequential(nn.Linear(h2, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(h2, attention_dim), nn.Sigmoid()) if self.gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(h2, n_classes)
        if self.gated and type(self) is AttentionMIL:
            self.kind = "gated"  # type: ignore[misc]

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention (n_tiles,) of embedded tiles h (n_tiles, h2)."""
        a = self.attention_v(h)  # (n_tiles, attention_dim)
        if self.attention_u is not None:
            a = a * self.attention_u(h)
        return self.attention_w(a).squeeze(-1)  # (n_tiles,)

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.attention_scores(h)
        pooled = torch.softmax(scores, dim=0) @ h  # (h2,)
        return self.classifier(pooled), scores

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> MILHead:
        """The head a saved ``state_dict`` came from (any kind: see :func:`load_head`)."""
        return load_head(state)


class CLAMSingleBranch(AttentionMIL):
    """CLAM-SB: gated attention and per-class instance classifiers on the top/bottom-k tiles."""

    kind = "clam_sb"
    marker = "instance_classifiers.0.weight"

    def __init__(self, in_dim: int, n_classes: int, **kwargs):
        super().__init__(in_dim, n_classes, attention="gated", **kwargs)
        h2 = self.classifier.in_features
        self.k = CLAM_K  # a constant: a saved head does not record it
        self.instance_classifiers = nn.ModuleList(nn.Linear(h2, 2) for _ in range(n_classes))

    def slide_weight(self) -> float:
        return CLAM_BAG_WEIGHT

    def auxiliary_loss(self, out: MILOutput, label: int) -> torch.Tensor | None:
        """The slide's class's instance classifier: its top-k attended tiles are in class (1), its
        bottom-k out of it (0); k shrinks to half the bag on small bags."""
        k = min(self.k, len(out.attention) // 2)
        if k < 1 or out.tiles is None:
            return None
        order = torch.argsort(out.attention, descending=True)
        chosen = torch.cat([order[:k], order[-k:]])
        target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
        logits = self.instance_classifiers[label](out.tiles[chosen])  # (2k, 2)
        return nn.functional.cross_entropy(logits, target)


class MeanPool(MILHead):
    kind = "mean"
    marker = "mean_classifier.weight"

    def __init__(self, in_dim: int, n_classes: int, **kwargs):
        super().__init__(in_dim, n_classes, **kwargs)
        self.mean_classifier = nn.Linear(self.embed[3].out_features, n_classes)

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mean_classifier(h.mean(0))  # = the mean of the tiles' logits (affine head)
        return logits, _margin(self.mean_classifier(h), logits)


class MaxPool(MILHead):
    kind = "max"
    marker = "tile_classifier.weight"

    def __init__(self, in_dim: int, n_classes: int, **kwargs):
        super().__init__(in_dim, n_classes, **kwargs)
        self.tile_classifier = nn.Linear(self.embed[3].out_features, n_classes)

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tile_logits = self.tile_classifier(h)  # (n_tiles, n_classes)
        if tile_logits.shape[1] == 2:  # the tile most for class 1
            scores = tile_logits[:, 1] - tile_logits[:, 0]
        else:  # the tile with the most confident class (CLAM's multi-class rule)
            scores = torch.log_softmax(tile_logits, dim=1).max(1).values
        return tile_logits[torch.argmax(scores)], scores


def _margin(tile_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each tile's logit for the class the slide points to (1 of 2; else the slide's argmax) less its
    mean logit: (n_tiles,)."""
    if tile_logits.shape[1] == 2:
        target = tile_logits[:, 1]
    else:  # a tensor index, not a Python int: the ONNX graph keeps the choice
        target = tile_logits.index_select(1, torch.argmax(logits.detach()).reshape(1)).squeeze(1)
    return target - tile_logits.mean(1)


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual; also the class token's attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transmil: the token width {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, dim = x.shape  # (1 + n_tiles, dim): the class token first
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        mixed = nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # (heads, n, d/h)
        cls = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(dim // self.heads), dim=-1)
        return x + self.out(mixed.transpose(0, 1).reshape(n, dim)), cls[:, 0, 1:].mean(0)


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: the tile tokens on a square grid, depthwise convolutions."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tiles = x[:1], x[1:]  # (1, dim), (side * side, dim)
        grid = tiles.transpose(0, 1).reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].transpose(0, 1)])


class TransMIL(MILHead):
    kind = "transmil"
    marker = "cls_token"

    def __init__(self, in_dim: int, n_classes: int, **kwargs):
        super().__init__(in_dim, n_classes, **kwargs)
        dim = self.embed[3].out_features
        self.cls_token = nn.Parameter(torch.zeros(1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        # a constant number of heads: no weight's shape records it, so a saved head could not say
        self.layer1, self.layer2 = _SelfAttention(dim, TRANSMIL_HEADS), _SelfAttention(dim, TRANSMIL_HEADS)
        self.ppeg = _PPEG(dim)
        self.norm = nn.LayerNorm(dim)
        self.transmil_classifier = nn.Linear(dim, n_classes)

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        side = math.ceil(torch.sym_sqrt(n))  # symbolic under torch.export: the bag length stays free
        padded = torch.cat([h, h.repeat(2, 1)[: side * side - n]])  # side^2 - n < n + 1: 2 copies do
        x = torch.cat([self.cls_token, padded])  # (1 + side * side, dim)
        x, _ = self.layer1(x)
        x = self.ppeg(x, side)
        x, cls_attention = self.layer2(x)
        logits = self.transmil_classifier(self.norm(x[0]))
        return logits, torch.log(cls_attention[:n].clamp_min(1e-30))  # the real tiles' share


HEADS: dict[str, type[MILHead]] = {
    "abmil": AttentionMIL,
    "gated": AttentionMIL,
    "clam_sb": CLAMSingleBranch,
    "transmil": TransMIL,
    "mean": MeanPool,
    "max": MaxPool,
}


def build_head(
    kind: str,
    in_dim: int,
    n_classes: int,
    *,
    hidden_dims: tuple[int, int] = (256, 64),
    attention_dim: int = 32,
    dropout: float = 0.0,
    patch_head: bool = False,
) -> MILHead:
    """A new head of ``kind`` (one of :data:`AGGREGATORS`)."""
    if kind not in HEADS:
        raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {kind!r}")
    common = {"hidden_dims": hidden_dims, "dropout": dropout, "patch_head": patch_head}
    if kind in ("abmil", "gated"):
        attention = "gated" if kind == "gated" else "paper"
        return AttentionMIL(in_dim, n_classes, attention_dim=attention_dim, attention=attention, **common)
    if kind == "clam_sb":
        return CLAMSingleBranch(in_dim, n_classes, attention_dim=attention_dim, **common)
    return HEADS[kind](in_dim, n_classes, **common)


def head_kind(state: dict[str, torch.Tensor]) -> str:
    """Which kind of head a ``state_dict`` is, from the parameter names only that kind has."""
    for kind in ("clam_sb", "transmil", "mean", "max", "abmil"):
        if HEADS[kind].marker in state:
            if kind == "abmil" and "attention_u.0.weight" in state:
                return "gated"
            return kind
    raise ValueError(f"not a MIL head's state_dict (none of its layers: {', '.join(list(state)[:4])})")


def load_head(state: dict[str, torch.Tensor]) -> MILHead:
    """The head a saved ``state_dict`` came from, in eval mode: the kind from its layer names, the sizes
    from its shapes; loaded strictly (any other key is an error)."""
    try:
        kind = head_kind(state)
        h1, in_dim = state["embed.0.weight"].shape
        h2 = state["embed.3.weight"].shape[0]
        n_classes = {
            "clam_sb": "classifier.weight",
            "abmil": "classifier.weight",
            "gated": "classifier.weight",
            "transmil": "transmil_classifier.weight",
            "mean": "mean_classifier.weight",
            "max": "tile_classifier.weight",
        }[kind]
        n_classes = state[n_classes].shape[0]
        attention_dim = state["attention_w.weight"].shape[1] if "attention_w.weight" in state else 32
    except (KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"not an attention-MIL state_dict (missing or odd {exc})") from exc
    model = build_head(
        kind,
        in_dim,
        n_classes,
        hidden_dims=(h1, h2),
        attention_dim=attention_dim,
        patch_head="patch_classifier.weight" in state,
    )
    model.load_state_dict(state)  # strict: any other key is an error
    return model.eval()
