"""Loading encoder weights from checkpoint files in third-party layouts, strictly and safely.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects. Known layouts are mapped onto timm's parameter names:
- torchvision / timm ResNet and DenseNet keys (identical names), including DenseNet's pre-0.4
  ``norm.1`` style;
- wrapper prefixes ``module.`` (DataParallel), ``model.``, ``backbone.``, ``encoder.``, ``_orig_mod.``
  (torch.compile), ``resnet.`` (Ciga et al.'s SimCLR ResNet18), in any combination;
- checkpoint containers ``state_dict`` (PyTorch Lightning), ``model``, ``model_state_dict``, ``net``;
- KimiaNet's PyTorch DenseNet121 (``module.model.features.*`` + ``fc_4``);
- lukemelas EfficientNet (``_conv_stem``, ``_blocks.N.*``), mapped in order and shape onto timm.
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

from histotransfer.errors import WeightsError

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "resnet.")
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_OLD_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_LUKEMELAS_MARKERS = ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight")
_STATE_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from known containers (safe unpickling only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(
            f"cannot load {path} as a weights-only checkpoint ({type(exc).__name__}: {exc}); "
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


def map_to_model(
    tensors: dict[str, torch.Tensor], full_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors onto the full (uncut) timm model's state_dict names."""
    targets = set(full_state)
    stripped = {_strip_prefixes(k, targets): v for k, v in tensors.items()}
    if any(k.endswith(m) for k in stripped for m in _LUKEMELAS_MARKERS):
        stripped = {k: v for k, v in stripped.items() if k.split(".")[-1] in _STATE_SUFFIXES}
        return _map_lukemelas(stripped, full_state)
    return {_OLD_DENSENET.sub(lambda m: m.group(1) + m.group(2), k): v for k, v in stripped.items()}


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> list[str]:
    """Load every tensor ``model`` has (BatchNorm counters excepted) or raise listing what is missing.

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
    model.load_state_dict({k: tensors[k] for k in state if k in tensors}, strict=False)
    return sorted(set(tensors) - set(state))


def state_sha256(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a model's tensors: what the weights *are*."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
