"""Attention-MIL heads: the paper's attention pooling (default) and Ilse et al.'s gated attention.

features (n_tiles, D) -> Linear(D, 256) -> ReLU -> Linear(256, 64) -> ReLU -> h (n_tiles, 64)
attention: Linear(64, 32) -> Tanh -> Linear(32, 1), softmax over the slide's tiles
           (gated: tanh(V h) * sigmoid(U h) -> Linear(32, 1))
slide logits: Linear(64, n_classes) on sum_i a_i h_i; optional patch logits Linear(64, n_classes) on h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_KINDS = ("paper", "gated")


@dataclass(frozen=True)
class MILOutput:
    logits: torch.Tensor  # (n_classes,)
    attention: torch.Tensor  # (n_tiles,), sums to 1
    patch_logits: torch.Tensor | None  # (n_tiles, n_classes) when the patch head is on


class AttentionMIL(nn.Module):
    """One bag (a slide's tiles) in, slide logits and per-tile attention out."""

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
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        h1, h2 = hidden_dims
        self.embed = nn.Sequential(
            nn.Linear(in_dim, h1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.gated = attention == "gated"
        self.attention_v = nn.Sequential(nn.Linear(h2, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(h2, attention_dim), nn.Sigmoid()) if self.gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(h2, n_classes)
        self.patch_classifier = nn.Linear(h2, n_classes) if patch_head else None

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention (n_tiles,) of embedded tiles h (n_tiles, h2)."""
        a = self.attention_v(h)  # (n_tiles, attention_dim)
        if self.attention_u is not None:
            a = a * self.attention_u(h)
        return self.attention_w(a).squeeze(-1)  # (n_tiles,)

    def forward(self, features: torch.Tensor) -> MILOutput:
        h = self.embed(features)  # (n_tiles, h2)
        attention = torch.softmax(self.attention_scores(h), dim=0)  # (n_tiles,)
        pooled = attention @ h  # (h2,)
        patch = (
            self.patch_classifier(h) if self.patch_classifier is not None else None
        )  # (n_tiles, n_classes)
        return MILOutput(self.classifier(pooled), attention, patch)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AttentionMIL:
        """The head a saved ``state_dict`` came from: sizes from its shapes, variants from its layers."""
        try:
            h1, in_dim = state["embed.0.weight"].shape
            h2 = state["embed.3.weight"].shape[0]
            attention_dim = state["attention_w.weight"].shape[1]
            n_classes = state["classifier.weight"].shape[0]
        except (KeyError, AttributeError, ValueError) as exc:
            raise ValueError(f"not an attention-MIL state_dict (missing or odd {exc})") from exc
        model = cls(
            in_dim,
            n_classes,
            hidden_dims=(h1, h2),
            attention_dim=attention_dim,
            attention="gated" if "attention_u.0.weight" in state else "paper",
            patch_head="patch_classifier.weight" in state,
        )
        model.load_state_dict(state)  # strict: any other key is an error
        return model.eval()
