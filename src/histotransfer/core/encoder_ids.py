"""Encoder ids, ``ARCH[@CUT][+WEIGHTS]``: parsed, checked against the catalogue, and formatted. Torch-free.

    resnet18, resnet18@layer3, densenet121@transition2+random, densenet121+kimianet, resnet18@layer4+ft

``ARCH`` is a key of ``architectures.ARCHS``, ``CUT`` one of its cut points, ``WEIGHTS`` a tag: none means
the architecture's default weights, ``random`` a seeded random init, any other tag weights given as a
file or hub id; a fine-tuned copy of an id is the id with ``+ft``. An id names folders of features/,
mil/ and finetune/ (histotransfer.io.layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from histotransfer.core.architectures import ARCHS, list_cut_points
from histotransfer.core.errors import ConfigError

# ARCH[@CUT][+WEIGHTS][+ft]: also what a folder of features/, mil/ or finetune/ is named (outputs.py)
ENCODER_ID = re.compile(
    r"^(?P<arch>[a-z0-9_]+)(?:@(?P<cut>[A-Za-z0-9_.]+))?(?:\+(?P<tag>[A-Za-z0-9_.-]+(?:\+ft)?))?$"
)
RANDOM = "random"
FT_TAG = "ft"


@dataclass(frozen=True)
class EncoderId:
    arch: str
    cut: str | None = None
    tag: str | None = None  # None: default pretrained weights

    def __str__(self) -> str:
        return self.arch + (f"@{self.cut}" if self.cut else "") + (f"+{self.tag}" if self.tag else "")


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


def untagged_weights_ok(arch: str, weights: str) -> bool:
    """Whether ``weights`` may be stored under the plain id: the default weights themselves, or a
    foundation model's published file (a local copy of it, read offline)."""
    spec = ARCHS[arch]
    if weights == spec.default_weights:
        return True
    return (
        spec.published_file
        and not weights.startswith(("hf-hub:", "asset:", "file:"))
        and weights
        not in (
            "timm",
            RANDOM,
        )
    )
