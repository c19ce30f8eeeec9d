"""What the encoder catalogue (histotransfer.core.architectures) gives the rest of features/: the module names
around a trunk's blocks, every id an architecture offers, the table `histotransfer encoders` prints, and
shrunk copies of transformers for tests. Torch-free; building an encoder is histotransfer.features.encoders.
"""

from __future__ import annotations

from dataclasses import replace

from histotransfer.core.architectures import ARCHS, ArchSpec, list_cut_points, numbered_blocks
from histotransfer.core.encoder_ids import EncoderId

# The stem (before the first block) is a chain too, but no study cuts there.
STEM_MODULES = frozenset({"conv1", "bn1", "act1", "maxpool", "conv0", "norm0", "pool0", "conv_stem"})
HEAD_MODULES = frozenset({"global_pool", "fc", "classifier", "head", "head_drop", "fc_norm", "head_dist"})


def list_encoders(family: str | None = None) -> list[str]:
    """Every architecture (of one family: cnn, vit, swin) and every cut point, as encoder ids with
    default weights."""
    archs = [a for a, spec in ARCHS.items() if family is None or spec.family == family]
    return [str(EncoderId(a, c)) for a in archs for c in (None, *list_cut_points(a))]


def shrunk(spec: ArchSpec) -> ArchSpec:
    """A tiny copy of a transformer: the same timm class, checkpoint layout, token rule and input,
    with ``spec.small``'s width and depth; for tests, where a ViT-g cannot run."""
    if not spec.small:
        return spec
    kwargs = {**spec.create_kwargs, **spec.small}
    if spec.family == "swin":
        width = kwargs["embed_dim"] * 2 ** (len(kwargs["depths"]) - 1)
        return replace(spec, create_kwargs=kwargs, dim=width, small={})
    width = kwargs.get("pool_dim") if spec.token == "attn_pool" else kwargs["embed_dim"]
    dim = 2 * width if spec.token == "cls+mean" else width
    return replace(spec, create_kwargs=kwargs, dim=dim, cuts=numbered_blocks(kwargs["depth"]), small={})


def _cut_range(cuts: tuple[str, ...]) -> str:
    """``blocks.0 .. blocks.23`` for a numbered run, else the names."""
    if len(cuts) > 4 and all(c == f"blocks.{i}" for i, c in enumerate(cuts)):
        return f"blocks.0 .. blocks.{len(cuts) - 1}"
    return ", ".join(cuts)


def encoder_table() -> list[dict[str, str]]:
    """One row per architecture: what `histotransfer encoders` prints and docs/encoders.md's table shows."""
    rows = []
    for name, spec in ARCHS.items():
        if spec.default_weights == "timm" or spec.default_weights.startswith("asset:"):
            weights = "ImageNet (" + ("timm hub" if spec.default_weights == "timm" else "offline asset") + ")"
        elif spec.default_weights.startswith("hf-hub:"):
            weights = f"your file of hf.co/{spec.default_weights[len('hf-hub:') :]}"
        else:
            weights = "your " + spec.default_weights[len("file:") :]
        rows.append(
            {
                "arch": name,
                "dim": str(spec.dim) + ("" if spec.family == "vit" else " (full)"),
                "input": f"{spec.input_size} px" if spec.family != "cnn" else "any",
                "mpp": f"{spec.mpp:g}" if spec.mpp else "-",
                "tokens": spec.token,
                "cuts": _cut_range(spec.cuts),
                "weights": weights,
                "description": spec.description,
            }
        )
    return rows
