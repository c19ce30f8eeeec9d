"""Pathology foundation models: each registered one loads a checkpoint in its authors' published layout,
strictly, and gives features of its documented width; a neighbouring model's checkpoint is refused;
every cut of a transformer pools by the model's token rule.

The checkpoints here are random tensors. Most models are far too big to run in a test, so they are
written in a shrunk configuration (``registry.shrunk``: the same timm class, checkpoint layout, token
rule and input, width 48 and depth 3) by the writers in tests/checkpoints.py, which produce each
published layout (Hugging Face ViTModel / Dinov2Model, CONCH's open_clip CoCa, CTransPath's timm-0.5
Swin, timm) independently of the loader's converters. One full-size check per model builds it on the
meta device (no memory) and compares the published layout's keys and shapes, its width and its
parameter count.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from skimage import data

from histotransfer.cka.layers import layer_cka
from histotransfer.core.architectures import ARCHS
from histotransfer.core.encoder_ids import EncoderId
from histotransfer.features.encoders import (
    PatchEncoder,
    _reference_state,
    _timm_model,
    block_modules,
    build_encoder,
    check_architecture,
    leading_parameters,
    trunk_path,
)
from histotransfer.features.registry import list_encoders, shrunk
from histotransfer.features.weights import WeightsError, map_to_model
from tests.checkpoints import FMS, published_layout, random_model, shrink_foundation_models, write_published
from tests.helpers import REPO

# Widths and sizes from the model cards and papers (M parameters of the tile encoder, +-2%).
DOCUMENTED = {
    "retccl": (2048, 23.5),
    "ctranspath": (768, 27.5),
    "uni": (1024, 303),
    "uni2_h": (1536, 681),
    "conch": (
        512,
        87.6,
    ),  # ViT-B/16 at 448 px and the contrastive pooler (the paper's 90M has the caption one too)
    "virchow2": (2560, 631),
    "h_optimus_0": (1536, 1135),
    "h_optimus_1": (1536, 1135),
    "gigapath": (1536, 1134),
    "phikon": (768, 86),
    "phikon_v2": (1024, 303),
    "hibou_b": (768, 86),
    "hibou_l": (1024, 303),
    "kaiko_vits16": (384, 21.7),
    "kaiko_vitb8": (768, 86),
    "lunit_vits8": (384, 21.7),
}

# (model, a neighbour whose checkpoint it must refuse)
NEIGHBOURS = [
    ("uni", "virchow2"),  # SwiGLU MLP and registers
    ("uni2_h", "h_optimus_0"),  # plain MLP, 4 not 8 registers
    ("h_optimus_0", "gigapath"),  # patch 16, no registers
    ("gigapath", "uni"),
    ("virchow2", "uni2_h"),
    ("conch", "phikon"),  # a ViT-B/16 at 224 px, no pooler
    ("phikon", "hibou_b"),  # Dinov2 layout with registers and layer scale
    ("phikon_v2", "phikon"),  # ViT layout (no layer scale)
    ("hibou_b", "phikon"),
    ("hibou_l", "phikon_v2"),  # no registers
    ("kaiko_vits16", "lunit_vits8"),  # patch 8
    ("kaiko_vitb8", "kaiko_vits16"),
    ("lunit_vits8", "kaiko_vits16"),
    ("ctranspath", "retccl"),
    ("retccl", "ctranspath"),
]


@pytest.fixture
def small(monkeypatch):
    """Every foundation model shrunk (one catalogue dict, read by the registry and by encoders)."""
    shrink_foundation_models(monkeypatch)


def _tiles(arch: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Crops of a real stained-tissue picture (scikit-image's IHC sample), at the model's input size."""
    size = ARCHS[arch].input_size
    image = np.tile(data.immunohistochemistry(), (2, 2, 1))  # (1024, 1024, 3)
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, image.shape[0] - size, (n, 2))
    crops = np.stack([image[y : y + size, x : x + size] for y, x in corners])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def _normalised(arch: str, tiles: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ARCHS[arch].norm)
    return (tiles.float() / 255 - mean) / std


def _reference(model, arch: str, spatial: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """The embedding by the model's token rule, from timm's normed patch and prefix tokens."""
    spec = ARCHS[arch]
    if spec.token == "attn_pool":  # CONCH's pooler attends over every token, the class token too
        return model.ln_contrast(model.attn_pool_contrast(torch.cat([prefix, spatial], dim=1))[:, 0])
    if spec.token == "cls+mean":
        return torch.cat([prefix[:, 0], spatial.mean(dim=1)], dim=1)
    return prefix[:, 0]


# ---- every model, shrunk: its published file loads strictly and gives its features ----------------


@pytest.mark.parametrize("arch", FMS)
def test_a_published_checkpoint_loads_strictly_and_gives_the_models_features(tmp_path, small, arch):
    model, state = random_model(arch)
    folder = write_published(tmp_path / arch, arch, state)
    encoder = build_encoder(arch, weights=folder)  # the plain id: the user's copy of the published file
    assert encoder.weights_source.startswith("file:")
    tiles = _tiles(arch)
    x = _normalised(arch, tiles)
    with torch.no_grad():
        got = encoder.module(tiles)
        if ARCHS[arch].family == "vit":
            spatial, prefix = model.forward_intermediates(
                x,
                indices=[len(model.blocks) - 1],
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )[0]
            want = _reference(model, arch, spatial, prefix)
        else:  # timm's own forward: global average pooling (ResNet), mean of the normed last stage (Swin)
            want = model(x)
    assert got.shape == (2, ARCHS[arch].dim) == (2, encoder.dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    provenance = encoder.provenance()
    assert provenance["token_rule"] == ARCHS[arch].token
    assert provenance["mean"] == list(ARCHS[arch].norm[0])
    assert provenance["input_size"] == ARCHS[arch].input_size


def test_hibous_own_release_in_dinov2s_layout_loads_as_its_hugging_face_file_does(tmp_path, small):
    model, state = random_model("hibou_b")
    hf = build_encoder("hibou_b", weights=write_published(tmp_path / "hf", "hibou_b", state))
    own = build_encoder(
        "hibou_b+own", weights=write_published(tmp_path / "own", "hibou_b", state, layout="dinov2")
    )
    # the same tensors in the model from either file (the class token up to rounding: both files store
    # it minus its position embedding)
    torch.testing.assert_close(hf.module.model.state_dict(), own.module.model.state_dict())
    assert model.blocks[0].mlp.fc1.weight.shape[0] == 2 * model.blocks[0].mlp.fc2.weight.shape[1]  # SwiGLU


@pytest.mark.slow  # 16 pairs of two built models each; the loading tests above stay fast
@pytest.mark.parametrize(("arch", "neighbour"), NEIGHBOURS)
def test_a_neighbouring_models_checkpoint_is_refused(tmp_path, small, arch, neighbour):
    _, state = random_model(neighbour)
    folder = write_published(tmp_path / neighbour, neighbour, state)
    with pytest.raises(WeightsError, match=r"is not a|lacks|wrong shape") as info:
        build_encoder(arch, weights=folder)
    assert re.search(rf"it looks like a (\w+ or )*{neighbour}\b", str(info.value))  # and says whose it is


def _meta_encoder(arch: str):
    """The full-size model and its PatchEncoder (whole network) on the meta device: no memory."""
    spec = ARCHS[arch]
    with torch.device("meta"):
        model = _timm_model(arch)
        path = trunk_path(model, spec) if spec.family == "cnn" else None
        encoder = PatchEncoder(
            model,
            path,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            input_size=spec.input_size,
            family=spec.family,
            token=spec.token,
        )
    return model, encoder


@pytest.mark.slow  # full-size models (meta device): the shrunk ones are checked in the fast tier
@pytest.mark.parametrize("arch", FMS)
def test_the_full_size_published_layout_matches_key_for_key_on_the_meta_device(arch):
    spec = ARCHS[arch]
    model, encoder = _meta_encoder(arch)
    with torch.device("meta"):
        published = published_layout(arch, model.state_dict())
        published = published.get("model", published)  # CTransPath's container
        out = encoder(torch.zeros(1, 3, spec.input_size, spec.input_size, dtype=torch.uint8))
    reference = _reference_state(arch)
    tensors = map_to_model(published, reference, spec.layout)
    check_architecture(tensors, reference, EncoderId(arch), source=arch)
    needed = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert not set(needed) - set(tensors), sorted(set(needed) - set(tensors))[:5]
    assert [k for k in needed if tensors[k].shape != needed[k].shape] == []
    width, millions = DOCUMENTED[arch]
    assert out.shape[1] == spec.dim == width
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.02, n


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in FMS if ARCHS[a].family != "cnn"])
def test_every_full_size_cut_has_its_documented_width_on_the_meta_device(arch):
    """One meta forward per model, each block's output pooled as a cut there pools it."""
    spec = ARCHS[arch]
    model, encoder = _meta_encoder(arch)
    with torch.device("meta"):
        widths = {}
        for name, block in block_modules(model, arch).items():
            final = name == spec.cuts[-1]
            block.register_forward_hook(
                lambda _m, _i, out, name=name, final=final: widths.__setitem__(
                    name, encoder.pool(out, final=final).shape[1]
                )
            )
        encoder(torch.zeros(1, 3, spec.input_size, spec.input_size, dtype=torch.uint8))
    assert list(widths) == list(spec.cuts)
    if spec.family == "vit":  # one width at every depth: the sweep compares like with like
        assert set(widths.values()) == {spec.dim}
    else:  # Swin-T's stages
        assert list(widths.values()) == [96, 192, 384, 768]


# ---- truncation: every cut of every transformer ------------------------------------------------------


def _cuts(arch: str) -> list[str]:
    return list(shrunk(ARCHS[arch]).cuts)


@pytest.mark.parametrize(
    ("arch", "cut"),
    [(a, c) for a in FMS if ARCHS[a].family != "cnn" for c in _cuts(a)],
)
def test_a_cut_transformer_pools_the_cut_blocks_tokens_by_the_models_rule(tmp_path, small, arch, cut):
    model, state = random_model(arch)
    folder = write_published(tmp_path / arch, arch, state)
    encoder = build_encoder(f"{arch}@{cut}+mine", weights=folder)
    k = int(cut.rsplit(".", 1)[1])
    tiles = _tiles(arch)
    x = _normalised(arch, tiles)
    with torch.no_grad():
        got = encoder.module(tiles)
        if ARCHS[arch].family == "vit":  # timm's intermediates: final norm applied, prefix tokens apart
            spatial, prefix = model.forward_intermediates(
                x,
                indices=[k],
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )[0]
            assert prefix.shape[1] == model.num_prefix_tokens  # class + registers, never in the mean
            want = _reference(model, arch, spatial, prefix)
        else:  # Swin: the final norm only fits (and only follows) the last stage
            grid = model.forward_intermediates(x, indices=[k], norm=True, intermediates_only=True)[0]
            want = grid.mean(dim=(2, 3))
    assert got.shape == (2, ARCHS[arch].dim if ARCHS[arch].family == "vit" else want.shape[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # strictness covers exactly the cut network: later blocks are unused, not required
    assert any(key.startswith(("blocks.", "layers.")) for key in encoder.unused_keys) == (
        k + 1 < len(_cuts(arch))
    )


def test_every_entry_names_a_layout_the_loader_reads_and_a_source():
    from histotransfer.features.weights import LAYOUTS

    for arch in FMS:
        assert ARCHS[arch].layout in LAYOUTS, arch
        assert ARCHS[arch].source, arch
        assert None not in (ARCHS[arch].mpp, ARCHS[arch].input_size, ARCHS[arch].norm), arch
    with pytest.raises(ValueError, match="token rule 'gap'"):
        type(ARCHS["uni"])("vit_small_patch16_224", "timm", family="vit")  # a ViT needs a token rule


def test_list_encoders_names_every_cut_of_a_transformer():
    ids = list_encoders("vit")
    assert "uni@blocks.0" in ids
    assert "uni@blocks.23" in ids
    assert "h_optimus_0@blocks.39" in ids
    assert "uni@blocks.24" not in ids
    assert {i.split("@")[0] for i in list_encoders("swin")} == {"ctranspath"}


def test_cka_between_two_cuts_of_one_vit(tmp_path, small):
    # random tensors everywhere (a fresh init's layer scale of 1e-5 leaves every block near identity)
    folder = write_published(tmp_path, "uni", random_model("uni")[1])
    full = build_encoder("uni", weights=folder)
    cut = build_encoder("uni@blocks.1", weights=folder)  # its two blocks are the full model's first two
    tiles = list(_tiles("uni", n=24, seed=3))
    result = layer_cka(full, cut, tiles, batch_size=8, device="cpu")
    assert result.layers_a == ["blocks.0", "blocks.1", "blocks.2"]
    assert result.layers_b == ["blocks.0", "blocks.1"]
    assert result.matrix.shape == (3, 2)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-5)
    assert np.all(result.matrix <= 1.0 + 1e-6)
    assert list(block_modules(cut.module.model, "uni")) == ["blocks.0", "blocks.1"]


def test_cka_between_two_foundation_models(tmp_path, small):
    a = build_encoder(
        "virchow2", weights=write_published(tmp_path / "a", "virchow2", random_model("virchow2")[1])
    )
    b = build_encoder("ctranspath+random")  # timm's init: N(0, 0.2) everywhere flattens a Swin's features
    result = layer_cka(a, b, list(_tiles("uni", n=48)), batch_size=16, device="cpu")
    assert result.matrix.shape == (3, 4)
    assert np.isfinite(result.matrix).all()
    assert np.all(np.abs(result.matrix) <= 1.0 + 1e-6)


# ---- fine-tuning a transformer ------------------------------------------------------------------------


def test_freezing_the_first_blocks_of_a_vit_freezes_its_stem_and_tokens(small):
    encoder = build_encoder("virchow2+random")
    model = encoder.module.model
    frozen = {id(p) for p in leading_parameters(model, "virchow2", 2)}
    names = {name for name, p in model.named_parameters() if id(p) in frozen}
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight"} <= names
    assert any(n.startswith("blocks.1.") for n in names)
    assert not any(n.startswith("blocks.2.") for n in names)
    assert not any(n.startswith("norm.") for n in names)
    assert leading_parameters(model, "virchow2", 0) == []
    with pytest.raises(ValueError, match="cannot freeze 4"):
        leading_parameters(model, "virchow2", 4)


def test_gradient_checkpointing_gives_the_same_gradients(small):
    encoder = build_encoder("uni2_h+random")
    module = encoder.module.train()
    tiles = _tiles("uni2_h", n=3)
    grads = []
    for remember in (False, True):
        module.zero_grad()
        module.grad_checkpointing = remember
        module(tiles).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


# ---- weights that are not at hand -------------------------------------------------------------------


def test_a_foundation_model_without_weights_says_where_to_get_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"huggingface\.co/MahmoodLab/uni .*--weights PATH") as info:
        build_encoder("uni")
    assert "gated" in str(info.value)
    assert "uni+random" in str(info.value)
    with pytest.raises(WeightsError, match=r"cannot download pytorch_model.bin from MahmoodLab/uni"):
        build_encoder("uni", weights="hf-hub:MahmoodLab/uni")  # asked for, but the hub is unreachable
    with pytest.raises(WeightsError, match=r"ctranspath.pth"):
        build_encoder("ctranspath@layers.2")
    with pytest.raises(WeightsError, match="name these weights with a tag"):
        build_encoder("uni", weights="hf-hub:someone/uni-finetuned")


def test_a_model_folder_must_name_its_checkpoint(tmp_path, small):
    _, _state = random_model("lunit_vits8")
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="holds 2 checkpoint files"):
        build_encoder("lunit_vits8", weights=tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "a.pth").unlink()
    with pytest.raises(WeightsError, match=r"cannot read .* as safetensors"):
        build_encoder("lunit_vits8", weights=tmp_path)


def test_the_guide_table_is_what_histotransfer_encoders_prints(capsys):
    from histotransfer.cli import main

    assert main(["encoders", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in (REPO / "docs" / "encoders.md").read_text()
    assert main(["encoders"]) == 0
    listing = capsys.readouterr().out
    assert "virchow2" in listing
    assert "cls+mean" in listing
    assert "blocks.0 .. blocks.31" in listing
