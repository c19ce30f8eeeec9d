"""The two pieces of published pathology encoders that timm cannot express on its own.

- ``ConvStem``: CTransPath's patch embedding (Wang et al. 2022): two stride-2 3x3 convolutions with
  BatchNorm and ReLU, then a 1x1 projection to the Swin width, then LayerNorm; a drop-in
  ``embed_layer`` for timm's SwinTransformer (NHWC output, as timm's PatchEmbed gives it).
- ``AttentionalPooler``: CONCH's contrastive pooler (Lu et al. 2024; CoCa's attentional pooling):
  learned queries attend over the LayerNormed trunk tokens with multi-head attention whose keys and
  values come from the trunk's width.

Parameter names follow the published checkpoints (``proj.0`` .. ``proj.6``, ``norm``; ``query``,
``attn``, ``ln_q``, ``ln_k``), so their tensors load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """(n, 3, h, w) -> (n, h/4, w/4, embed_dim): CTransPath's convolutional stem."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        **_: object,
    ):
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 4 or embed_dim % 8 or output_fmt != "NHWC":
            raise ValueError(
                f"ConvStem needs patch 4, a width divisible by 8 and NHWC (got {patch}, {embed_dim})"
            )
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} != the stem's image size {self.img_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NCHW -> NHWC


class AttentionalPooler(nn.Module):
    """(n, tokens, context_dim) -> (n, n_queries, d_model): learned queries attending over tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]
