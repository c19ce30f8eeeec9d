"""The encoder registry's torch-free part: architectures, their cut points, encoder ids.

Validating a config, listing encoders and naming feature folders need only this, so commands that
never build an encoder (tile, sample-data, report, predict) do not import torch or timm. Building an
encoder is histotransfer.features.encoders, which re-exports all of this; a test checks that each
architecture's static ``cuts`` equal the cut points of its timm model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from histotransfer.errors import ConfigError
from histotransfer.layout import ENCODER_ID

# The stem (before the first block) is a chain too, but no study cuts there.
STEM_MODULES = frozenset({"conv1", "bn1", "act1", "maxpool", "conv0", "norm0", "pool0", "conv_stem"})
HEAD_MODULES = frozenset({"global_pool", "fc", "classifier", "head", "head_drop", "fc_norm", "head_dist"})
RANDOM = "random"
FT_TAG = "ft"


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture with timm, and where its default weights come from."""

    timm_name: str
    default_weights: str  # "timm" (timm's pretrained tag), "hf-hub:ORG/NAME" or "asset:NAME"
    flatten: tuple[str, ...] = ()  # sequential containers whose children are cut points
    sequential: bool = True  # the trunk is a chain of modules (CNNs); transformers have no cut points
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    cuts: tuple[str, ...] = ()  # the cut points, in forward order; equal to the timm model's (tested)


_RESNET = ("layer1", "layer2", "layer3", "layer4")

ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("resnet18", "timm", description="ImageNet ResNet18 (paper)", cuts=_RESNET),
    "resnet34": ArchSpec("resnet34", "timm", description="ImageNet ResNet34 (paper)", cuts=_RESNET),
    "resnet50": ArchSpec(
        "resnet50", "timm", description="ImageNet ResNet50 (paper; @layer3 is CLAM's)", cuts=_RESNET
    ),
    "densenet121": ArchSpec(
        "densenet121",
        "timm",
        flatten=("features",),
        description="ImageNet DenseNet121 (paper; KimiaNet's)",
        cuts=(
            *(f"{kind}{i}" for i in (1, 2, 3) for kind in ("denseblock", "transition")),
            "denseblock4",
            "norm5",
        ),
    ),
    "efficientnet_lite0": ArchSpec(
        "efficientnet_lite0",
        "asset:efficientnet_lite0_imagenet",
        flatten=("blocks",),
        description="ImageNet EfficientNet-Lite0 (weights from a registry package: works offline)",
        cuts=(*(f"blocks.{i}" for i in range(7)), "conv_head", "bn2"),
    ),
    "uni": ArchSpec(
        "vit_large_patch16_224",
        "hf-hub:MahmoodLab/uni",
        sequential=False,
        create_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        description="UNI pathology foundation model, ViT-L/16 (gated on Hugging Face)",
    ),
}


@dataclass(frozen=True)
class EncoderId:
    arch: str
    cut: str | None = None
    tag: str | None = None  # None: default pretrained weights

    def __str__(self) -> str:
        return self.arch + (f"@{self.cut}" if self.cut else "") + (f"+{self.tag}" if self.tag else "")


def list_encoders() -> list[str]:
    """Every architecture and every cut point, as encoder ids with default weights."""
    return [str(EncoderId(a, c)) for a in ARCHS for c in (None, *list_cut_points(a))]


def parse_encoder_id(text: str) -> EncoderId:
    match = ENCODER_ID.match(text)
    if not match:
        raise ConfigError(
            f"malformed encoder id {text!r}: expected ARCH[@CUT][+WEIGHTS], e.g. resnet18@layer3+random"
        )
    enc = EncoderId(match["arch"], match["cut"], match["tag"])
    if enc.arch not in ARCHS:
        raise ConfigError(f"unknown architecture {enc.arch!r} in {text!r}; known: {', '.join(ARCHS)}")
    if enc.cut is not None and enc.cut not in list_cut_points(enc.arch):
        valid = ", ".join(list_cut_points(enc.arch)) or "none"
        raise ConfigError(f"unknown cut point {enc.cut!r} for {enc.arch}; valid: {valid}")
    return enc


def finetuned_id(encoder_id: str) -> str:
    """The id of a fine-tuned copy: the id with ``+ft`` (``resnet18@layer3+ft``,
    ``densenet121+kimianet+ft``), so a DVC stage can name it by appending ``+ft``."""
    enc = parse_encoder_id(encoder_id)
    if frozen_id(encoder_id) is not None:
        raise ConfigError(f"{encoder_id} is already a fine-tuned id")
    return str(EncoderId(enc.arch, enc.cut, f"{enc.tag}+{FT_TAG}" if enc.tag else FT_TAG))


def frozen_id(encoder_id: str) -> str | None:
    """The inverse of finetuned_id: ``X+ft`` -> ``X``; None for an id that is not fine-tuned."""
    enc = parse_encoder_id(encoder_id)
    if enc.tag == FT_TAG:
        return str(EncoderId(enc.arch, enc.cut, None))
    if enc.tag is not None and enc.tag.endswith(f"+{FT_TAG}"):
        return str(EncoderId(enc.arch, enc.cut, enc.tag.removesuffix(f"+{FT_TAG}")))
    return None


def list_cut_points(arch: str) -> list[str]:
    """Block boundaries the network can be cut after (layer1..4, denseblock1, transition1, blocks.3)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return list(ARCHS[arch].cuts)
