"""Pathology foundation models' checkpoints for tests: random tensors in each model's published
layout (Hugging Face ViTModel / Dinov2Model, CONCH's open_clip CoCa, CTransPath's timm-0.5 Swin, timm),
written from timm's names independently of the loader's converters; ``shrink_foundation_models`` makes
every model small enough to run (``registry.shrunk``: width 48, depth 3). Used by the unit tests of the
loaders and by the study of two foundation models (tests/integration/)."""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from histotransfer.core.architectures import ARCHS
from histotransfer.features.encoders import _timm_model
from histotransfer.features.registry import shrunk

FMS = [arch for arch, spec in ARCHS.items() if spec.published_file]


def shrink_foundation_models(monkeypatch) -> None:
    """Every foundation model shrunk, for one test (``monkeypatch`` undoes it)."""
    for arch in FMS:
        monkeypatch.setitem(ARCHS, arch, shrunk(ARCHS[arch]))


def random_model(arch: str, seed: int = 1):
    """The architecture with every tensor random (layer scale and norms included, so each block
    matters), in eval mode; its timm-named state."""
    torch.manual_seed(seed)
    model = _timm_model(arch)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif value.is_floating_point():
            state[key] = torch.randn_like(value) * 0.2
        else:
            state[key] = value
    model.load_state_dict(state)
    return model.eval(), state


# ---- the published layouts, written from timm's names -------------------------------------------


def _hf_blocks(state, block_names):
    out = {}
    for key, value in state.items():
        if not (m := re.match(r"^blocks\.(\d+)\.(.+)$", key)):
            continue
        i, rest = m.groups()
        layer = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = value.chunk(3)
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"{layer}attention.attention.{name}.{kind}"] = part
            continue
        for timm_name, hf in block_names:
            if rest == timm_name or rest.startswith(timm_name + "."):
                out[layer + hf + rest[len(timm_name) :]] = value
                break
        else:
            raise AssertionError(f"no Hugging Face name for {key}")
    return out


def _to_hf_vit(state):  # transformers ViTModel (Phikon)
    names = [
        ("norm1", "layernorm_before"),
        ("attn.proj", "attention.output.dense"),
        ("norm2", "layernorm_after"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ]
    width = state["cls_token"].shape[-1]
    return {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
        "pooler.dense.weight": torch.randn(width, width),
        "pooler.dense.bias": torch.randn(width),
        **_hf_blocks(state, names),
    }


def _to_hf_dinov2(state, swiglu: bool = False):  # transformers Dinov2Model; registers as Hibou's
    mlp = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")  # Dinov2SwiGLUFFN's names
    names = [
        ("norm1", "norm1"),
        ("attn.proj", "attention.output.dense"),
        ("ls1.gamma", "layer_scale1.lambda1"),
        ("norm2", "norm2"),
        ("mlp.fc1", f"mlp.{mlp[0]}"),
        ("mlp.fc2", f"mlp.{mlp[1]}"),
        ("ls2.gamma", "layer_scale2.lambda1"),
    ]
    cls, pos = state["cls_token"], state["pos_embed"]
    out = {}
    if "reg_token" in state:  # HF: the class token has position 0; timm: positions for patches only
        first = torch.randn_like(cls)
        cls, pos = cls - first, torch.cat([first, pos], dim=1)
        out["embeddings.register_tokens"] = state["reg_token"]
    return out | {
        "embeddings.cls_token": cls,
        "embeddings.mask_token": torch.zeros(1, cls.shape[-1]),
        "embeddings.position_embeddings": pos,
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
        **_hf_blocks(state, names),
    }


def _to_dinov2_original(state):  # facebookresearch/dinov2's names (Hibou's own release)
    out = {}
    for key, value in state.items():
        out[key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")] = value
    first = torch.randn_like(out["cls_token"])  # the class token's position, as in _to_hf_dinov2
    out["register_tokens"] = out.pop("reg_token")
    out["cls_token"] = out["cls_token"] - first
    out["pos_embed"] = torch.cat([first, out["pos_embed"]], dim=1)
    return out | {"mask_token": torch.zeros(1, first.shape[-1])}


def _to_conch(state):  # open_clip CoCa: visual.trunk + the poolers, the text tower beside it
    out = {}
    for key, value in state.items():
        pooler = key.startswith(("attn_pool_contrast.", "ln_contrast."))
        out[("visual." if pooler else "visual.trunk.") + key] = value
    width = state["ln_contrast.weight"].shape[0]
    return out | {
        "visual.proj_contrast": torch.randn(width, width),
        "visual.attn_pool_caption.query": torch.randn(4, width),
        "visual.ln_caption.weight": torch.ones(width),
        "text.token_embedding.weight": torch.randn(10, width),
        "logit_scale": torch.ones([]),
    }


def _to_ctranspath(state):  # timm 0.5 Swin: downsampling at the end of a stage; index and mask buffers
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                49, 49
            ).long()
        if re.search(r"blocks\.1\.norm1\.weight$", key):
            out[key.replace("norm1.weight", "attn_mask")] = torch.zeros(4, 49, 49)
    width = state["norm.weight"].shape[0]
    return {"model": out | {"head.weight": torch.randn(1000, width), "head.bias": torch.randn(1000)}}


def published_layout(arch: str, state, layout: str | None = None):
    spec = ARCHS[arch]
    swiglu = spec.create_kwargs.get("mlp_layer") == "swiglu_packed"
    writers = {
        "hf_vit": _to_hf_vit,
        "hf_dinov2": lambda state: _to_hf_dinov2(state, swiglu),
        "dinov2": _to_dinov2_original,
        "conch": _to_conch,
        "ctranspath": _to_ctranspath,
    }
    return writers.get(layout or spec.layout, dict)(state)


def write_published(folder, arch: str, state, layout: str | None = None):
    """The published file in a model folder, named as its hub repository names it."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = published_layout(arch, state, layout)
    name = ARCHS[arch].hub_files[0] if ARCHS[arch].default_weights.startswith("hf-hub:") else "weights.pth"
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name)
    else:
        torch.save(tensors, folder / name)
    return folder
