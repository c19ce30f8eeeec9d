"""Loading encoder weights from checkpoint files in third-party layouts, strictly and safely.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects. Known layouts are mapped onto timm's parameter names:
- torchvision / timm ResNet and DenseNet keys (identical names), including DenseNet's pre-0.4
  ``norm.1`` style;
- wrapper prefixes ``module.`` (DataParallel), ``model.``, ``backbone.``, ``encoder.``, ``_orig_mod.``
  (torch.compile), ``resnet.`` (Ciga et al.'s SimCLR ResNet18), in any combination;
- checkpoint containers ``state_dict`` (PyTorch Lightning), ``model``, ``model_state_dict``, ``net``;
- KimiaNet's PyTorch DenseNet121 (``module.model.features.*`` + ``fc_4``);
- lukemelas EfficientNet (``_conv_stem``, ``_blocks.N.*``), mapped in order and shape onto timm;
- the foundation models' published layouts (``LAYOUTS``): Hugging Face ``ViTModel`` (Phikon) and
  ``Dinov2Model`` with or without register tokens (Phikon-v2, Hibou), CONCH's open_clip CoCa
  (``visual.trunk.*`` + its attentional pooler), CTransPath's timm-0.5 Swin (downsampling at the end of
  a stage). A file already in timm's names passes through unchanged.
Files are ``.pth``/``.bin``/``.pt`` (torch) or ``.safetensors``; a folder holding one of the names these
models are distributed as (``WEIGHT_FILES``) stands for that file.
Loading is strict: every tensor of the (cut) network must come from the file, or the error lists what
is missing; ``features.encoders.check_architecture`` also refuses a file of another architecture.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from histotransfer.core.errors import WeightsError

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "resnet.")
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_OLD_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_LUKEMELAS_MARKERS = ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight")
_STATE_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "pytorch_model_vision.bin",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def weights_file(path: str | Path) -> Path:
    """``path`` itself, or the checkpoint inside a model folder (a hub snapshot, a download)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsError(f"weights file {path} not found")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    raise WeightsError(
        f"weights folder {path} holds {len(found)} checkpoint files "
        f"({', '.join(p.name for p in found[:6])}), "
        f"none named {' or '.join(WEIGHT_FILES)}: give the file itself"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {path} as safetensors ({type(exc).__name__}: {exc})") from exc


def _reason(exc: Exception) -> str:
    """torch's reason for refusing a file, without its advice to load it unsafely: what its unpickler
    said, when it said something, else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            said = line.split(marker, 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"not a plain checkpoint: {said}"[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (or model folder), unwrapped from known containers (safe
    unpickling only; safetensors hold nothing but tensors)."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(
            f"cannot load {path} as a weights-only checkpoint ({type(exc).__name__}: {_reason(exc)}); "
            "histotransfer never unpickles arbitrary objects: re-save the file as a plain state_dict"
        ) from exc
    for _ in range(3):  # containers may nest (e.g. {"state_dict": {"model": ...}})
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} contains no tensors (keys: {', '.join(list(map(str, obj))[:10])})")
    return tensors


def _strip_prefixes(key: str, targets: set[str]) -> str:
    while key not in targets:
        prefix = next((p for p in WRAPPER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    return key


def _map_lukemelas(
    tensors: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet -> timm: same tensors in the same order, names differ."""
    if len(tensors) != len(target):
        raise WeightsError(
            f"lukemelas EfficientNet checkpoint has {len(tensors)} tensors, the timm model {len(target)}: "
            "not the same architecture"
        )
    mapped = {}
    for (src, value), (dst, ref) in zip(tensors.items(), target.items(), strict=True):
        if value.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"lukemelas EfficientNet tensor {src} {tuple(value.shape)} does not line up with timm's "
                f"{dst} {tuple(ref.shape)}: not the same architecture"
            )
        mapped[dst] = value
    return mapped


def _hf_prefix(tensors: dict[str, torch.Tensor]) -> str | None:
    """The prefix of a Hugging Face vision model's keys ('' for ViTModel/Dinov2Model, ``vit.``,
    ``dinov2.`` or ``model.`` for a wrapper); None when the file is not in that layout."""
    for key in tensors:
        if key.endswith("embeddings.cls_token"):
            return key[: -len("embeddings.cls_token")]
    return None


def _hf_blocks(
    tensors: dict[str, torch.Tensor], prefix: str, names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """``encoder.layer.I.*`` -> ``blocks.I.*`` by ``names``; query/key/value -> one qkv tensor."""
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(rf"^{re.escape(prefix)}encoder\.layer\.(\d+)\.(.+)$")
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not (m := layer.match(key)):
            continue
        block, rest = m.group(1), m.group(2)
        if (q := re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)) is not None:
            qkv.setdefault((block, q.group(2)), {})[q.group(1)] = value
            continue
        for hf, timm_name in names.items():
            if rest == hf or rest.startswith(hf + "."):
                out[f"blocks.{block}.{timm_name}{rest[len(hf) :]}"] = value
                break
        else:
            out[f"blocks.{block}.{rest}"] = value  # unknown: kept, so strict loading names it
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsError(f"block {block} has {sorted(parts)} of query/key/value {kind}, not all three")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


_HF_VIT_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_DINOV2_BLOCK = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # SwiGLU (use_swiglu_ffn): gate and value packed, as timm's GluMlp
    "mlp.weights_out": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}


_HF_EMBEDDINGS = {  # Hugging Face name (after the model's prefix) -> timm name
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _hf_embeddings(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Class/register tokens, position and patch embeddings, final norm renamed; every other tensor
    outside the blocks (mask token, pooler, a classifier) kept as it is, to be reported unused."""
    out = {}
    for key, value in tensors.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name.startswith("encoder.layer."):
            continue  # the blocks: _hf_blocks
        out[_HF_EMBEDDINGS.get(name, name)] = value
    if "reg_token" in out and "pos_embed" in out:
        # DINOv2 with registers: the class token carries position 0; timm's no_embed_class model
        # adds positions to the patches only and concatenates [cls, registers, patches], as HF does
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _from_hf_vit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViTModel (Phikon) -> timm VisionTransformer."""
    if (prefix := _hf_prefix(tensors)) is None:
        return tensors
    return _hf_embeddings(tensors, prefix) | _hf_blocks(tensors, prefix, _HF_VIT_BLOCK)


def _from_hf_dinov2(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2Model, with or without registers (Phikon-v2, Hibou), or the original
    DINOv2 code's layout (Hibou's own release) -> timm."""
    if (prefix := _hf_prefix(tensors)) is None:
        return _from_dinov2_original(tensors)
    return _hf_embeddings(tensors, prefix) | _hf_blocks(tensors, prefix, _HF_DINOV2_BLOCK)


def _from_dinov2_original(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2's names (``register_tokens``, ``mlp.w12``/``w3`` for SwiGLU) -> timm;
    a file without them (timm's names already) passes through."""
    if "register_tokens" not in tensors and not any(".mlp.w12." in k for k in tensors):
        return tensors
    out = {}
    for key, value in tensors.items():
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key))] = value
    if "register_tokens" in out and "pos_embed" in out:  # as for Hugging Face's, above
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _from_conch(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CONCH's CoCa: the vision trunk (``visual.trunk.*``) and contrastive pooler become the model;
    the text tower, caption pooler and projection stay behind (reported as unused)."""
    if not any(k.startswith("visual.trunk.") for k in tensors):
        return tensors
    out = {}
    for key, value in tensors.items():
        if key.startswith("visual.trunk."):
            out[key[len("visual.trunk.") :]] = value
        elif key.startswith(("visual.attn_pool_contrast.", "visual.ln_contrast.")):
            out[key[len("visual.") :]] = value
        else:
            out[key] = value
    return out


def _from_old_swin(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 0.5 Swin (CTransPath): downsampling ends stage i there, starts stage i+1 in timm 1.x;
    the relative-position index and attention masks are recomputed buffers, not weights."""
    old = "layers.0.downsample.reduction.weight" in tensors
    out = {}
    for key, value in tensors.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if old:
            key = re.sub(
                r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key
            )
        out[key] = value
    return out


LAYOUTS = {
    "timm": None,
    "torchvision": None,
    "hf_vit": _from_hf_vit,
    "hf_dinov2": _from_hf_dinov2,
    "conch": _from_conch,
    "ctranspath": _from_old_swin,
}


def map_to_model(
    tensors: dict[str, torch.Tensor], full_state: dict[str, torch.Tensor], layout: str = "timm"
) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors onto the full (uncut) timm model's state_dict names."""
    if (convert := LAYOUTS[layout]) is not None:
        tensors = convert(tensors)
    targets = set(full_state)
    stripped = {_strip_prefixes(k, targets): v for k, v in tensors.items()}
    if any(k.endswith(m) for k in stripped for m in _LUKEMELAS_MARKERS):
        stripped = {k: v for k, v in stripped.items() if k.split(".")[-1] in _STATE_SUFFIXES}
        return _map_lukemelas(stripped, full_state)
    return {_OLD_DENSENET.sub(lambda m: m.group(1) + m.group(2), k): v for k, v in stripped.items()}


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [
        name
        for name, t in tensors.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> list[str]:
    """Load every tensor ``model`` has (BatchNorm counters excepted) or raise listing what is missing,
    of the wrong shape, or not finite.

    Returns the checkpoint keys that were not used (heads, projection layers, cut-off blocks).
    """
    state = model.state_dict()
    missing = [k for k in state if k not in tensors and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise WeightsError(f"{source} lacks {len(missing)} tensor(s) the network needs: {shown}")
    wrong = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}"
        for k, v in state.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(f"{source} has tensors of the wrong shape: {'; '.join(wrong[:8])}")
    used = {k: tensors[k] for k in state if k in tensors}
    if broken := non_finite(used):
        shown = ", ".join(broken[:4]) + (f", ... ({len(broken)} in all)" if len(broken) > 4 else "")
        raise WeightsError(
            f"{source} has NaN or infinite values in {len(broken)} tensor(s) the network needs: {shown}; "
            "the training that wrote it diverged or the file is damaged: use an earlier checkpoint"
        )
    model.load_state_dict(used, strict=False)
    return sorted(set(tensors) - set(state))


def state_sha256(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a model's tensors: what the weights *are*."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
