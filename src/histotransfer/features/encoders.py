"""The encoder registry: an encoder id names architecture, cut point and weights.

    ARCH[@CUT][+WEIGHTS]      e.g. resnet18, resnet18@layer3, densenet121@transition2+random,
                              densenet121+kimianet (with --weights FILE), resnet18@layer4+ft

``ARCH`` is a key of ``ARCHS`` (built with timm), ``CUT`` one of ``list_cut_points(ARCH)`` (the network
is run up to and including that module, then globally average-pooled), ``WEIGHTS`` a tag: none means the
architecture's default pretrained weights, ``random`` an explicit seeded random init, any other tag
weights given as a file or hub id. Asking for weights that cannot be had is an error, never a silent
fallback to random.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F

from histotransfer.assets import AssetError, fetch_asset
from histotransfer.errors import ConfigError
from histotransfer.features.registry import (  # the torch-free part of the registry, re-exported
    ARCHS,
    HEAD_MODULES,
    RANDOM,
    STEM_MODULES,
    ArchSpec,
    EncoderId,
    parse_encoder_id,
)
from histotransfer.features.registry import FT_TAG as FT_TAG
from histotransfer.features.registry import finetuned_id as finetuned_id
from histotransfer.features.registry import frozen_id as frozen_id
from histotransfer.features.registry import list_cut_points as list_cut_points
from histotransfer.features.registry import list_encoders as list_encoders
from histotransfer.features.weights import (
    WeightsError,
    load_strict,
    map_to_model,
    read_checkpoint,
    state_sha256,
)
from histotransfer.provenance import sha256_file

log = logging.getLogger(__name__)


def _timm_model(arch: str, *, pretrained: bool | str = False, num_classes: int = 0) -> nn.Module:
    spec = ARCHS[arch]
    name = spec.timm_name
    if isinstance(pretrained, str):  # a hub id replaces the architecture name
        name, pretrained = pretrained, True
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **spec.create_kwargs)


def trunk_path(model: nn.Module, spec: ArchSpec) -> list[str] | None:
    """Module names, in forward order, of the model's feature trunk; None when it is not a chain."""
    if not spec.sequential:
        return None
    path: list[str] = []
    for name, child in model.named_children():
        if name in HEAD_MODULES:
            continue
        if name in spec.flatten and isinstance(child, nn.Sequential):
            path += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            path.append(name)
    return path


def _cut_name(module_path: str) -> str:
    container, _, child = module_path.rpartition(".")
    return module_path if child.isdigit() else (child or container)


def trunk_cut_points(arch: str) -> list[str]:
    """The cut points of ``arch`` as its timm model has them (built on the meta device): what the
    registry's static ``ArchSpec.cuts`` must equal (a test checks it)."""
    with torch.device("meta"):
        path = trunk_path(_timm_model(arch), ARCHS[arch])
    return [_cut_name(p) for p in path or [] if _cut_name(p) not in STEM_MODULES]


class PatchEncoder(nn.Module):
    """uint8 tiles (n, 3, h, w) -> features (n, dim): normalisation, trunk up to the cut, pooling."""

    def __init__(self, model: nn.Module, path: list[str] | None, *, mean, std, input_size: int | None):
        super().__init__()
        self.model = model
        self.path = path  # None: the whole network with its own pooling (num_classes=0)
        self.input_size = input_size  # resize to this when the network needs a fixed size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = (tiles.float() - self.mean) / self.std  # (n, 3, h, w)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        if self.path is None:
            return self.model(x)  # (n, dim)
        for name in self.path:
            x = self.model.get_submodule(name)(x)
        return x.mean(dim=(2, 3))  # (n, dim)


def block_modules(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    """The blocks (cut points) a built network still has, in forward order, by cut-point name."""
    path = trunk_path(model, ARCHS[arch])
    if path is None:
        raise ConfigError(f"{arch} is not a chain of blocks: it has no named layers to compare")
    blocks = {}
    for p in path:
        module = model.get_submodule(p)
        if _cut_name(p) not in STEM_MODULES and not isinstance(module, nn.Identity):
            blocks[_cut_name(p)] = module
    return blocks


def leading_modules(model: nn.Module, arch: str, n_blocks: int) -> list[nn.Module]:
    """The stem and the first ``n_blocks`` cut-point blocks of a trunk: what "freeze N blocks" freezes."""
    path = trunk_path(model, ARCHS[arch])
    if path is None:
        raise ConfigError(f"{arch} is not a chain of blocks: freezing the first blocks is not defined for it")
    names = [_cut_name(p) for p in path]
    blocks = [n for n in names if n not in STEM_MODULES]
    if not 0 <= n_blocks <= len(blocks):
        raise ConfigError(f"{arch} has {len(blocks)} blocks ({', '.join(blocks)}); cannot freeze {n_blocks}")
    end = names.index(blocks[n_blocks - 1]) + 1 if n_blocks else 0
    return [model.get_submodule(p) for p in path[:end]]


@dataclass
class Encoder:
    """A built encoder and everything the artifacts record about it."""

    id: EncoderId
    module: PatchEncoder
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # the network's native input size (tiles of other sizes are fed as they are for CNNs)
    weights_source: str
    weights_sha256: str
    unused_keys: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder_id": str(self.id),
            "arch": self.id.arch,
            "timm_name": ARCHS[self.id.arch].timm_name,
            "cut": self.id.cut or "",
            "feature_dim": self.dim,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
        }


def _prune_after(model: nn.Module, path: list[str], keep: int) -> None:
    """Replace every trunk module after ``path[keep]`` and the head by Identity: they are never run."""
    for name in [*path[keep + 1 :], *(n for n, _ in model.named_children() if n in HEAD_MODULES)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())


def _weights_for(enc: EncoderId, weights: str | Path | None) -> str | Path | None:
    """Resolve what to load: None (random), a hub id / 'timm', an asset, or a file."""
    if enc.tag == RANDOM:
        if weights not in (None, RANDOM):
            raise WeightsError(f"{enc} asks for random weights but --weights {weights} was given")
        return None
    if weights == RANDOM:
        raise WeightsError(
            f"--weights random needs the id to say so: use {EncoderId(enc.arch, enc.cut, RANDOM)}"
        )
    default = ARCHS[enc.arch].default_weights
    if weights is not None and enc.tag is None and str(weights) != default:
        tagged = EncoderId(enc.arch, enc.cut, "mine")
        raise WeightsError(
            f"--weights {weights} with {enc}: features would be stored under {enc}, the id of its default "
            f"weights ({default}); name these weights with a tag, e.g. --encoder {tagged}"
        )
    if weights is not None:
        return weights
    if enc.tag is not None:
        raise WeightsError(f"{enc} names weights {enc.tag!r}: give them with --weights FILE (or a hub id)")
    return ARCHS[enc.arch].default_weights


def _reference_state(arch: str) -> dict[str, torch.Tensor]:
    """Names and shapes (no memory) of the full timm model with its ImageNet head: mapping targets."""
    with torch.device("meta"):
        return _timm_model(arch, num_classes=1000).state_dict()


# Architectures a checkpoint is compared with when it does not fit the one asked for (timm names).
NEIGHBOURS = (
    *(f"resnet{n}" for n in (18, 34, 50, 101, 152)),
    *(f"densenet{n}" for n in (121, 161, 169, 201)),
    *(f"efficientnet_lite{n}" for n in range(5)),
    *(f"efficientnet_b{n}" for n in range(5)),
    *(f"vit_{size}_patch16_224" for size in ("small", "base", "large")),
)


def _trunk(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k.split(".")[0] not in HEAD_MODULES}


def looks_like(tensors: dict[str, torch.Tensor]) -> str | None:
    """The architecture (a registry name, else a timm name) whose every trunk tensor the checkpoint
    has, in the same shape, with no trunk tensor left over; None when no known one fits."""
    registered = {spec.timm_name for spec in ARCHS.values() if not spec.create_kwargs}
    candidates = [*ARCHS, *(name for name in NEIGHBOURS if name not in registered)]
    for name in candidates:
        with torch.device("meta"):
            model = _timm_model(name) if name in ARCHS else timm.create_model(name, num_classes=0)
        trunk = _trunk(model.state_dict())
        tops = {k.split(".")[0] for k in trunk}
        mine = {k: v for k, v in tensors.items() if k.split(".")[0] in tops}
        needed = {k for k in trunk if not k.endswith("num_batches_tracked")}
        if needed <= set(mine) <= set(trunk) and all(mine[k].shape == trunk[k].shape for k in mine):
            return name
    return None


def check_architecture(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], enc: EncoderId, *, source: str
) -> None:
    """Refuse a checkpoint of another architecture: every tensor in the architecture's trunk modules
    (stem and blocks, later stages included) must be one the architecture has, in its shape. Heads
    (fc, classifier, ...) and modules the architecture does not have (projection heads) may differ."""
    trunk = _trunk(reference)
    tops = {k.split(".")[0] for k in trunk}
    extra = [k for k in tensors if k.split(".")[0] in tops and k not in trunk]
    wrong = [k for k in tensors if k in trunk and tensors[k].shape != trunk[k].shape]
    if not extra and not wrong:
        return
    problems = []
    if extra:
        problems.append(
            f"{len(extra)} trunk tensor(s) {enc.arch} does not have ({', '.join(extra[:4])}, ...)"
        )
    if wrong:
        shown = ", ".join(f"{k} {tuple(tensors[k].shape)} != {tuple(trunk[k].shape)}" for k in wrong[:4])
        problems.append(f"{len(wrong)} of another shape ({shown})")
    guess = looks_like(tensors)
    hint = (
        f"it looks like a {guess} checkpoint" if guess else "it matches no architecture histotransfer knows"
    )
    raise WeightsError(
        f"{source} is not a {enc.arch} checkpoint: {'; '.join(problems)}; {hint}. Give weights of "
        f"{enc.arch}, or an encoder id of the file's architecture"
    )


def _by_module(keys: list[str]) -> str:
    """``fc (2), layer4 (60)``: checkpoint keys counted by their top-level module."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + 1
    return ", ".join(f"{top} ({n})" for top, n in counts.items())


def _hub_model(enc: EncoderId, source: str) -> nn.Module:
    try:
        return _timm_model(enc.arch, pretrained=True if source == "timm" else source)
    except Exception as exc:  # hub errors come in many types; none may fall back to random
        raise WeightsError(
            f"cannot load pretrained weights for {enc} from {source} ({type(exc).__name__}: "
            f"{str(exc)[:300]}); give a local checkpoint with --weights FILE, or ask for "
            f"{EncoderId(enc.arch, enc.cut, RANDOM)}"
        ) from exc


def _checkpoint_file(enc: EncoderId, source: str | Path) -> Path:
    if str(source).startswith("asset:"):
        try:
            return fetch_asset(str(source)[len("asset:") :])
        except (AssetError, KeyError) as exc:
            raise WeightsError(f"cannot fetch the default weights of {enc}: {exc}") from exc
    return Path(source)


def build_encoder(
    encoder_id: str | EncoderId, *, weights: str | Path | None = None, seed: int = 0
) -> Encoder:
    """Build an encoder in eval mode on the CPU.

    ``weights``: None for what the id says (its default pretrained weights, or random for ``+random``);
    ``"timm"`` or ``"hf-hub:ORG/NAME"`` for hub weights; ``"asset:NAME"`` for a registry asset; otherwise
    a checkpoint file in any supported layout (see histotransfer.features.weights).
    """
    enc = parse_encoder_id(encoder_id) if isinstance(encoder_id, str) else encoder_id
    source = _weights_for(enc, weights)
    torch.manual_seed(seed)
    tensors, source_file = None, None
    if source is None:
        model, source_text = _timm_model(enc.arch), f"random (seed {seed})"
    elif source == "timm" or str(source).startswith("hf-hub:"):
        model = _hub_model(enc, str(source))
        source_text = str(source) if source != "timm" else f"timm:{model.pretrained_cfg.get('hf_hub_id', '')}"
    else:
        source_file = _checkpoint_file(enc, source)
        reference = _reference_state(enc.arch)
        tensors = map_to_model(read_checkpoint(source_file), reference)
        check_architecture(tensors, reference, enc, source=str(source_file))
        model = _timm_model(enc.arch)
        source_text = f"file:{source_file.name} (sha256 {sha256_file(source_file)[:16]})"
    spec = ARCHS[enc.arch]
    path = trunk_path(model, spec)
    cut_path = None
    if enc.cut is not None:
        keep = [_cut_name(p) for p in path].index(enc.cut)
        _prune_after(model, path, keep)  # before loading: strictness covers exactly the cut network
        cut_path = path[: keep + 1]
    unused = load_strict(model, tensors, source=str(source_file)) if tensors is not None else []
    if unused:
        log.info("%s: checkpoint tensors the network does not use: %s", enc, _by_module(unused))
    cfg = timm.data.resolve_data_config({}, model=model)
    input_size = int(cfg["input_size"][-1])
    fixed = bool(model.pretrained_cfg.get("fixed_input_size", False))
    module = PatchEncoder(
        model, cut_path, mean=cfg["mean"], std=cfg["std"], input_size=input_size if fixed else None
    )
    module.eval()
    probe = input_size if fixed or path is None else 64  # CNNs take any size: probe small
    with torch.no_grad():
        dim = int(module(torch.zeros(1, 3, probe, probe, dtype=torch.uint8)).shape[1])
    return Encoder(
        id=enc,
        module=module,
        dim=dim,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        input_size=input_size,
        weights_source=source_text,
        weights_sha256=state_sha256(module.model),
        unused_keys=unused,
    )
