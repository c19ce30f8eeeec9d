"""The encoder registry: an encoder id names architecture, cut point and weights.

    ARCH[@CUT][+WEIGHTS]      e.g. resnet18, resnet18@layer3, densenet121@transition2+random,
                              densenet121+kimianet (with --weights FILE), resnet18@layer4+ft

``ARCH`` is a key of ``ARCHS`` (built with timm), ``CUT`` one of ``list_cut_points(ARCH)`` (the network
is run up to and including that module, then globally average-pooled), ``WEIGHTS`` a tag: none means the
architecture's default pretrained weights, ``random`` an explicit seeded random init, any other tag
weights given as a file or hub id. Asking for weights that cannot be had is an error, never a silent
fallback to random. The catalogue is histotransfer.core.architectures, the id grammar
histotransfer.core.encoder_ids (both torch-free); this module builds what they name.
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
from torch.utils.checkpoint import checkpoint

from histotransfer.core.architectures import ARCHS, ArchSpec
from histotransfer.core.encoder_ids import RANDOM, EncoderId, parse_encoder_id, untagged_weights_ok
from histotransfer.core.errors import ConfigError
from histotransfer.features.modules import AttentionalPooler, ConvStem
from histotransfer.features.registry import HEAD_MODULES, STEM_MODULES
from histotransfer.features.weights import (
    WeightsError,
    load_strict,
    map_to_model,
    read_checkpoint,
    state_sha256,
    weights_file,
)
from histotransfer.io.assets import AssetError, fetch_asset
from histotransfer.io.provenance import sha256_file
from histotransfer.io.storage import StorageError, fetch_gcs, is_gcs_uri

log = logging.getLogger(__name__)


_MLP_LAYERS = {"swiglu_packed": timm.layers.SwiGLUPacked}


def _timm_model(arch: str, *, pretrained: bool | str = False, num_classes: int = 0) -> nn.Module:
    """The architecture as timm builds it, plus what timm cannot express (CTransPath's stem, CONCH's
    pooler), under the parameter names of the published checkpoints."""
    spec = ARCHS[arch]
    kwargs = dict(spec.create_kwargs)
    pool_dim, pool_heads = kwargs.pop("pool_dim", None), kwargs.pop("pool_heads", None)
    if "mlp_layer" in kwargs:
        kwargs["mlp_layer"] = _MLP_LAYERS[kwargs["mlp_layer"]]
    if spec.layout == "ctranspath":
        kwargs["embed_layer"] = ConvStem
    name = spec.timm_name
    if isinstance(pretrained, str):  # a hub id replaces the architecture name
        name, pretrained = pretrained, True
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if pool_dim:
        model.attn_pool_contrast = AttentionalPooler(pool_dim, model.embed_dim, pool_heads, n_queries=1)
        model.ln_contrast = nn.LayerNorm(pool_dim)
    return model


def _stages(model: nn.Module, spec: ArchSpec) -> nn.Sequential:
    """A transformer's chain of cut points: ViT blocks, Swin stages."""
    return model.blocks if spec.family == "vit" else model.layers


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
    spec = ARCHS[arch]
    with torch.device("meta"):
        model = _timm_model(arch)
    if not spec.sequential:
        prefix = "blocks" if spec.family == "vit" else "layers"
        return [f"{prefix}.{i}" for i in range(len(_stages(model, spec)))]
    return [_cut_name(p) for p in trunk_path(model, spec) or [] if _cut_name(p) not in STEM_MODULES]


class PatchEncoder(nn.Module):
    """uint8 tiles (n, 3, h, w) -> features (n, dim): normalisation, trunk up to the cut, pooling.

    CNNs run their chain of modules (``path``) and average-pool. Transformers embed patches, run their
    blocks (ViT) or stages (Swin) up to the cut and pool by the architecture's token rule, after the
    final norm: a ViT cut at any block gets the final LayerNorm, as the whole network does; a Swin stage
    before the last has another width than that norm and is pooled without it.
    """

    def __init__(
        self,
        model: nn.Module,
        path: list[str] | None,
        *,
        mean,
        std,
        input_size: int | None,
        family: str = "cnn",
        token: str = "gap",
        final: bool = True,
    ):
        super().__init__()
        self.model = model
        self.path = path  # CNNs: None is the whole network with its own pooling (num_classes=0)
        self.input_size = input_size  # resize to this when the network needs a fixed size
        self.family = family
        self.token = token
        self.final = final  # a Swin cut at its last stage: the final norm applies
        self.grad_checkpointing = False  # recompute each block's activations in the backward pass
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = (tiles.float() - self.mean) / self.std  # (n, 3, h, w)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        m = self.model
        if self.family == "vit":
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # (n, tokens, width)
            return self.pool(self._run(m.blocks, x), final=True)
        if self.family == "swin":
            return self.pool(self._run(m.layers, m.patch_embed(x)), final=self.final)  # NHWC in
        if self.path is None:
            return m(x)  # (n, dim)
        return self.pool(self._run([m.get_submodule(name) for name in self.path], x))

    def _run(self, modules, x: torch.Tensor) -> torch.Tensor:
        remember = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for module in modules:
            x = checkpoint(module, x, use_reentrant=False) if remember else module(x)
        return x

    def pool(self, x: torch.Tensor, *, final: bool = True) -> torch.Tensor:
        """One embedding per tile from a cut point's output: what a network cut there gives (the CKA
        of a layer compares exactly these)."""
        if self.family == "cnn":
            return x.mean(dim=(2, 3)) if x.ndim == 4 else x  # (n, channels)
        m = self.model
        if self.family == "swin":
            return (m.norm(x) if final else x).mean(dim=(1, 2))  # (n, h, w, c) -> (n, c)
        x = m.norm(x)  # (n, tokens, width)
        if self.token == "cls":
            return x[:, 0]
        if self.token == "attn_pool":
            return m.ln_contrast(m.attn_pool_contrast(x)[:, 0])
        patches = x[:, m.num_prefix_tokens :]  # class and register tokens excluded
        if self.token == "mean":
            return patches.mean(dim=1)
        return torch.cat([x[:, 0], patches.mean(dim=1)], dim=1)  # cls+mean


def block_modules(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    """The blocks (cut points) a built network still has, in forward order, by cut-point name."""
    spec = ARCHS[arch]
    if not spec.sequential:
        return dict(zip(spec.cuts, _stages(model, spec), strict=False))
    path = trunk_path(model, spec)
    if path is None:
        raise ConfigError(f"{arch} is not a chain of blocks: it has no named layers to compare")
    blocks = {}
    for p in path:
        module = model.get_submodule(p)
        if _cut_name(p) not in STEM_MODULES and not isinstance(module, nn.Identity):
            blocks[_cut_name(p)] = module
    return blocks


def leading_parameters(model: nn.Module, arch: str, n_blocks: int) -> list[nn.Parameter]:
    """The stem's and the first ``n_blocks`` cut-point blocks' parameters: what "freeze N blocks"
    freezes. A ViT's stem is its patch embedding with the class, register and position tokens."""
    spec = ARCHS[arch]
    if not 0 <= n_blocks <= len(spec.cuts):
        raise ConfigError(
            f"{arch} has {len(spec.cuts)} blocks ({spec.cuts[0]} .. {spec.cuts[-1]}); "
            f"cannot freeze {n_blocks}"
        )
    if not spec.sequential:
        stages = _stages(model, spec)
        if n_blocks > len(stages):
            raise ConfigError(f"{arch} is cut after {len(stages)} blocks; cannot freeze {n_blocks}")
        tokens = [getattr(model, n, None) for n in ("cls_token", "reg_token", "pos_embed")]
        if n_blocks == 0:
            return []
        params = [*model.patch_embed.parameters(), *(t for t in tokens if isinstance(t, nn.Parameter))]
        return params + [p for stage in stages[:n_blocks] for p in stage.parameters()]
    path = trunk_path(model, spec)
    names = [_cut_name(p) for p in path]
    blocks = [n for n in names if n not in STEM_MODULES]
    if n_blocks > len(blocks):
        raise ConfigError(f"{arch} is cut after {len(blocks)} blocks; cannot freeze {n_blocks}")
    end = names.index(blocks[n_blocks - 1]) + 1 if n_blocks else 0
    return [p for name in path[:end] for p in model.get_submodule(name).parameters()]


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
        spec = ARCHS[self.id.arch]
        return {
            "encoder_id": str(self.id),
            "arch": self.id.arch,
            "timm_name": spec.timm_name,
            "cut": self.id.cut or "",
            "feature_dim": self.dim,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "token_rule": spec.token,
            "model_mpp": spec.mpp if spec.mpp is not None else "",
            "checkpoint_layout": spec.layout,
        }


def _prune_after(model: nn.Module, path: list[str], keep: int) -> None:
    """Replace every trunk module after ``path[keep]`` and the head by Identity: they are never run."""
    for name in [*path[keep + 1 :], *(n for n, _ in model.named_children() if n in HEAD_MODULES)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())


def _prune_stages(model: nn.Module, spec: ArchSpec, keep: int) -> None:
    """Drop a transformer's blocks (stages) after ``keep``: the kept ones keep their names, so a
    checkpoint loads onto them; a Swin cut before its last stage also drops the final norm."""
    if spec.family == "vit":
        model.blocks = model.blocks[: keep + 1]
    else:
        model.layers = model.layers[: keep + 1]
        if keep + 1 < len(spec.cuts):
            model.norm = nn.Identity()


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
    spec = ARCHS[enc.arch]
    if weights is not None and enc.tag is None and not untagged_weights_ok(enc.arch, str(weights)):
        tagged = EncoderId(enc.arch, enc.cut, "mine")
        raise WeightsError(
            f"--weights {weights} with {enc}: features would be stored under {enc}, the id of its default "
            f"weights ({spec.default_weights}); name these weights with a tag, e.g. --encoder {tagged}"
        )
    if weights is not None:
        return weights
    if enc.tag is not None:
        raise WeightsError(f"{enc} names weights {enc.tag!r}: give them with --weights FILE (or a hub id)")
    if spec.published_file:
        raise WeightsError(_how_to_get(enc))
    return spec.default_weights


def _how_to_get(enc: EncoderId, problem: str = "") -> str:
    """What to do when a foundation model's weights are not at hand (most are gated)."""
    spec = ARCHS[enc.arch]
    random = EncoderId(enc.arch, enc.cut, RANDOM)
    if spec.default_weights.startswith("file:"):
        what = spec.default_weights[len("file:") :]
        return (
            f"{problem}{enc} needs its published checkpoint ({what}): give it with --weights PATH, "
            f"or ask for {random}"
        )
    repo = spec.default_weights[len("hf-hub:") :]
    files = " or ".join(spec.hub_files)
    return (
        f"{problem}{enc} reads its weights from a file you have: download {files} from "
        f"https://huggingface.co/{repo} (most pathology models are gated: accept the licence on that "
        f"page first, then `huggingface-cli download {repo}` with your token) and give --weights PATH "
        f"(the file or its folder); weights: hf-hub:{repo} downloads it when the hub is reachable and "
        f"you are logged in (HF_TOKEN); or ask for {random}"
    )


def _download(enc: EncoderId, source: str) -> Path:
    """A foundation model's published file from the hub, asked for by name (``hf-hub:ORG/NAME``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError

    repo = source[len("hf-hub:") :]
    for name in ARCHS[enc.arch].hub_files:
        try:
            return Path(hf_hub_download(repo, name))
        except RemoteEntryNotFoundError:  # the repository has another of the usual file names
            continue
        except Exception as exc:  # offline, gated (401/403), unknown repo: all end here
            if isinstance(exc, GatedRepoError):
                why = "it is gated and this account has not been granted access"
            else:
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise WeightsError(_how_to_get(enc, f"cannot download {name} from {repo} ({why}). ")) from exc
    raise WeightsError(_how_to_get(enc, f"{repo} has none of {', '.join(ARCHS[enc.arch].hub_files)}. "))


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


def looks_like(tensors: dict[str, torch.Tensor], raw: dict[str, torch.Tensor] | None = None) -> list[str]:
    """The architectures (registry names, else one timm name) whose every trunk tensor the checkpoint
    has, in the same shape, with no trunk tensor left over; empty when no known one fits. ``raw``, the
    file's own names, is mapped by each registered model's published layout before comparing."""
    registered = {spec.timm_name for spec in ARCHS.values() if not spec.create_kwargs}
    matches: list[str] = []
    for name in [*ARCHS, *(name for name in NEIGHBOURS if name not in registered)]:
        if matches and name not in ARCHS:
            break  # a registered model fits: timm's other names add nothing
        with torch.device("meta"):
            model = _timm_model(name) if name in ARCHS else timm.create_model(name, num_classes=0)
        trunk = _trunk(model.state_dict())
        mapped = tensors
        if raw is not None and name in ARCHS:
            try:
                mapped = map_to_model(raw, trunk, ARCHS[name].layout)
            except WeightsError:
                continue
        tops = {k.split(".")[0] for k in trunk}
        mine = {k: v for k, v in mapped.items() if k.split(".")[0] in tops}
        needed = {k for k in trunk if not k.endswith("num_batches_tracked")}
        if needed <= set(mine) <= set(trunk) and all(mine[k].shape == trunk[k].shape for k in mine):
            matches.append(name)
    return matches


def check_architecture(
    tensors: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    enc: EncoderId,
    *,
    source: str,
    raw: dict[str, torch.Tensor] | None = None,
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
    guess = looks_like(tensors, raw)
    hint = (
        f"it looks like a {' or '.join(guess)} checkpoint"
        if guess
        else "it matches no architecture histotransfer knows"
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
    """A local file for the weights: an asset, the cached download of a ``gs://`` object (a bucket's
    copy of a published checkpoint, as a pipeline on Kubernetes reads it), or the path itself."""
    if str(source).startswith("asset:"):
        try:
            return fetch_asset(str(source)[len("asset:") :])
        except (AssetError, KeyError) as exc:
            raise WeightsError(f"cannot fetch the default weights of {enc}: {exc}") from exc
    if is_gcs_uri(str(source)):
        try:
            return fetch_gcs(str(source))
        except StorageError as exc:
            raise WeightsError(f"cannot fetch the weights of {enc}: {exc}") from exc
    return Path(source)


def _load(model: nn.Module, enc: EncoderId, tensors, raw, *, source: str) -> list[str]:
    """load_strict, with what the file looks like when it lacks what the network needs."""
    try:
        return load_strict(model, tensors, source=source)
    except WeightsError as exc:
        guess = looks_like(tensors, raw)
        if not guess or enc.arch in guess:
            raise
        raise WeightsError(f"{exc}; it looks like a {' or '.join(guess)} checkpoint") from exc


def build_encoder(
    encoder_id: str | EncoderId, *, weights: str | Path | None = None, seed: int = 0
) -> Encoder:
    """Build an encoder in eval mode on the CPU.

    ``weights``: None for what the id says (its default pretrained weights, or random for ``+random``);
    ``"timm"`` or ``"hf-hub:ORG/NAME"`` for hub weights; ``"asset:NAME"`` for a registry asset; otherwise
    a checkpoint file or model folder in any supported layout (see histotransfer.features.weights).
    A foundation model's weights are its published file, loaded strictly; the hub is asked only when
    the weights say ``hf-hub:``.
    """
    enc = parse_encoder_id(encoder_id) if isinstance(encoder_id, str) else encoder_id
    spec = ARCHS[enc.arch]
    source = _weights_for(enc, weights)
    torch.manual_seed(seed)
    tensors, raw, source_file = None, None, None
    if source is not None and spec.published_file and str(source).startswith("hf-hub:"):
        source = _download(enc, str(source))
    if source is None:
        model, source_text = _timm_model(enc.arch), f"random (seed {seed})"
    elif source == "timm" or str(source).startswith("hf-hub:"):
        model = _hub_model(enc, str(source))
        source_text = str(source) if source != "timm" else f"timm:{model.pretrained_cfg.get('hf_hub_id', '')}"
    else:
        source_file = weights_file(_checkpoint_file(enc, source))
        reference = _reference_state(enc.arch)
        raw = read_checkpoint(source_file)
        tensors = map_to_model(raw, reference, spec.layout)
        check_architecture(tensors, reference, enc, source=str(source_file), raw=raw)
        model = _timm_model(enc.arch)
        source_text = f"file:{source_file.name} (sha256 {sha256_file(source_file)[:16]})"
    path = trunk_path(model, spec)
    cut_path, final = None, True
    if enc.cut is not None:  # prune before loading: strictness covers exactly the cut network
        keep = list(spec.cuts).index(enc.cut)
        if spec.sequential:
            keep = [_cut_name(p) for p in path].index(enc.cut)
            _prune_after(model, path, keep)
            cut_path = path[: keep + 1]
        else:
            _prune_stages(model, spec, keep)
            final = keep + 1 == len(spec.cuts)
    unused = _load(model, enc, tensors, raw, source=str(source_file)) if tensors is not None else []
    if unused:
        log.info("%s: checkpoint tensors the network does not use: %s", enc, _by_module(unused))
    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = spec.norm or (cfg["mean"], cfg["std"])
    input_size = spec.input_size or int(cfg["input_size"][-1])
    fixed = bool(model.pretrained_cfg.get("fixed_input_size", False)) or not spec.sequential
    module = PatchEncoder(
        model,
        cut_path,
        mean=mean,
        std=std,
        input_size=input_size if fixed else None,
        family=spec.family,
        token=spec.token,
        final=final,
    )
    module.eval()
    if spec.sequential:  # CNNs take any size: probe small; a transformer's width is its spec's (tested)
        probe = input_size if fixed else 64
        with torch.no_grad():
            dim = int(module(torch.zeros(1, 3, probe, probe, dtype=torch.uint8)).shape[1])
    else:
        dim = int(spec.dim)
    return Encoder(
        id=enc,
        module=module,
        dim=dim,
        mean=tuple(mean),
        std=tuple(std),
        input_size=input_size,
        weights_source=source_text,
        weights_sha256=state_sha256(module.model),
        unused_keys=unused,
    )
