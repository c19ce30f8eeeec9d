import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pydantic import ValidationError
from skimage import data

from histotransfer.core.architectures import ARCHS, list_cut_points
from histotransfer.core.config import EncoderConfig
from histotransfer.core.encoder_ids import parse_encoder_id
from histotransfer.features.encoders import build_encoder, trunk_path
from histotransfer.features.registry import list_encoders
from histotransfer.features.weights import WeightsError, map_to_model, read_checkpoint
from histotransfer.io.assets import fetch_asset

PAPER_DIMS = {
    "resnet18": 512,
    "resnet18@layer1": 64,
    "resnet18@layer2": 128,
    "resnet18@layer3": 256,
    "resnet18@layer4": 512,
    "resnet34@layer1": 64,
    "resnet34@layer2": 128,
    "resnet34@layer3": 256,
    "resnet34@layer4": 512,
    "resnet50": 2048,
    "resnet50@layer1": 256,
    "resnet50@layer2": 512,
    "resnet50@layer3": 1024,  # CLAM's truncated ResNet50
    "resnet50@layer4": 2048,
    "densenet121": 1024,
    "densenet121@denseblock1": 256,
    "densenet121@transition1": 128,
    "densenet121@denseblock2": 512,
    "densenet121@transition2": 256,
    "densenet121@denseblock3": 1024,
    "densenet121@transition3": 512,
    "densenet121@denseblock4": 1024,
    "efficientnet_lite0": 1280,
}


def test_every_paper_cut_point_is_registered():
    assert set(PAPER_DIMS) <= set(list_encoders())
    assert list_cut_points("resnet18") == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("encoder_id", list_encoders("cnn"))  # transformers: test_foundation_models.py
def test_every_registered_encoder_builds_and_encodes(encoder_id):
    encoder = build_encoder(f"{encoder_id}+random")
    if encoder_id in PAPER_DIMS:
        assert encoder.dim == PAPER_DIMS[encoder_id]
    cfg = timm.data.resolve_data_config({}, model=encoder.module.model)
    mean, std = ARCHS[encoder.id.arch].norm or (cfg["mean"], cfg["std"])  # the authors' where they say
    assert encoder.mean == tuple(mean)
    assert encoder.std == tuple(std)
    size = 96
    with torch.no_grad():
        out = encoder.module(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert out.shape == (2, encoder.dim)
    assert torch.isfinite(out).all()
    assert encoder.weights_source == "random (seed 0)"


@pytest.mark.parametrize("arch", [a for a, spec in ARCHS.items() if spec.sequential])
def test_trunk_chain_is_forward_features(arch):
    model = timm.create_model(ARCHS[arch].timm_name, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x
    with torch.no_grad():
        for name in trunk_path(model, ARCHS[arch]):
            y = model.get_submodule(name)(y)
        torch.testing.assert_close(y, model.forward_features(x))


def test_random_weights_are_seeded_and_hashed():
    a, b = build_encoder("resnet18@layer2+random"), build_encoder("resnet18@layer2+random")
    c = build_encoder("resnet18@layer2+random", seed=1)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resnet19", "unknown architecture 'resnet19'"),
        ("resnet18@layer5", "unknown cut point 'layer5' for resnet18; valid: layer1, layer2"),
        ("uni@blocks.24", "unknown cut point 'blocks.24' for uni; valid: blocks.0, blocks.1"),
        ("uni@layer3", "unknown cut point 'layer3' for uni"),
        ("resnet18@layer3+", "malformed encoder id"),
        ("../resnet18", "malformed encoder id"),
    ],
)
def test_bad_encoder_ids(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_encoder_id(text)


def test_pretrained_weights_that_cannot_be_had_are_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for encoder_id in ("resnet18", "densenet121@denseblock2"):
        with pytest.raises(WeightsError, match="cannot load pretrained weights") as info:
            build_encoder(encoder_id)
        assert "+random" in str(info.value)  # says how to ask for random weights explicitly


def test_weights_tags_must_agree_with_weights(tmp_path):
    with pytest.raises(WeightsError, match="names weights 'kimianet': give them with --weights"):
        build_encoder("densenet121+kimianet")
    with pytest.raises(WeightsError, match="asks for random weights"):
        build_encoder("resnet18+random", weights=tmp_path / "x.pth")


# ---- checkpoints in third-party layouts ----------------------------------------------------------


def _random_state(arch: str, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = timm.create_model(ARCHS[arch].timm_name, num_classes=num_classes)
    return {
        k: torch.randn_like(v, dtype=torch.float32).to(v.dtype) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def _layout(name: str, state: dict[str, torch.Tensor]):
    if name == "torchvision":
        return dict(state)
    if name == "dataparallel":
        return {f"module.{k}": v for k, v in state.items()}
    if name == "lightning-simclr":  # Ciga et al.: model.resnet.* plus a projection head
        tensors = {f"model.resnet.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        tensors |= {
            "model.resnet.fc.1.weight": torch.randn(128, 512),
            "model.resnet.fc.1.bias": torch.randn(128),
        }
        return {"epoch": 99, "global_step": 10, "state_dict": tensors, "hyper_parameters": {"lr": 0.1}}
    if name == "backbone":
        return {"model": {f"backbone.{k}": v for k, v in state.items()}}
    if name == "kimianet":  # DataParallel(fully_connected(model=densenet121.features, fc_4=Linear))
        tensors = {f"module.model.{k}": v for k, v in state.items() if k.startswith("features.")}
        return tensors | {"module.fc_4.weight": torch.randn(30, 1024), "module.fc_4.bias": torch.randn(30)}
    if name == "densenet-legacy":  # torchvision < 0.4 names: norm.1, conv.2, ...
        return {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("arch", "layout", "encoder_id"),
    [
        ("resnet18", "torchvision", "resnet18+tv"),
        ("resnet18", "dataparallel", "resnet18@layer3+dp"),
        ("resnet18", "lightning-simclr", "resnet18+ciga"),
        ("resnet50", "backbone", "resnet50@layer3+bb"),
        ("densenet121", "kimianet", "densenet121+kimianet"),
        ("densenet121", "densenet-legacy", "densenet121@transition2+legacy"),
    ],
)
def test_checkpoint_layouts_load_strictly(tmp_path, arch, layout, encoder_id):
    state = _random_state(arch)
    path = tmp_path / f"{layout}.pth"
    torch.save(_layout(layout, state), path)
    encoder = build_encoder(encoder_id, weights=path)
    loaded = encoder.module.model.state_dict()
    assert loaded  # the cut network has tensors, and every one came from the file:
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], msg=key)
    assert encoder.weights_source.startswith(f"file:{layout}.pth")


def test_lukemelas_efficientnet_layout(tmp_path):
    real = read_checkpoint(fetch_asset("efficientnet_lite0_imagenet"))
    assert next(iter(real)).startswith("_conv_stem")
    torch.manual_seed(0)
    fake = {
        k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v for k, v in real.items()
    }
    torch.save(fake, tmp_path / "lukemelas.pth")
    encoder = build_encoder("efficientnet_lite0@blocks.4+lm", weights=tmp_path / "lukemelas.pth")
    model = encoder.module.model
    torch.testing.assert_close(model.conv_stem.weight, fake["_conv_stem.weight"])
    torch.testing.assert_close(model.blocks[4][0].conv_pw.weight, fake["_blocks.8._expand_conv.weight"])


@pytest.mark.slow
def test_missing_tensors_are_listed_and_cut_networks_need_only_theirs(tmp_path):
    state = _random_state("resnet18")
    partial = {k: v for k, v in state.items() if not k.startswith("layer3.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(
        WeightsError, match=r"lacks \d+ tensor\(s\) the network needs: layer3\.1\.conv1\.weight"
    ):
        build_encoder("resnet18@layer3+p", weights=tmp_path / "partial.pth")
    assert build_encoder("resnet18@layer2+p", weights=tmp_path / "partial.pth").dim == 128


@pytest.mark.slow
def test_wrong_shapes_and_unsafe_pickles_are_refused(tmp_path):
    torch.save(_random_state("resnet50"), tmp_path / "r50.pth")
    with pytest.raises(
        WeightsError, match=r"not a resnet18 checkpoint: .*it looks like a resnet50 or retccl checkpoint"
    ):
        build_encoder("resnet18+r50", weights=tmp_path / "r50.pth")
    torch.save(
        {"state_dict": _random_state("resnet18"), "callback": Image.new("RGB", (1, 1))}, tmp_path / "obj.pth"
    )
    with pytest.raises(WeightsError, match="never unpickles arbitrary objects"):
        build_encoder("resnet18+obj", weights=tmp_path / "obj.pth")
    with pytest.raises(WeightsError, match="not found"):
        build_encoder("resnet18+x", weights=tmp_path / "missing.pth")


@pytest.mark.slow
@pytest.mark.parametrize("encoder_id", ["resnet18+r34", "resnet18@layer1+r34", "resnet18+ft"])
def test_a_deeper_network_of_the_same_family_is_refused(tmp_path, encoder_id):
    """Regression: a ResNet34 state_dict loaded into resnet18 (its every tensor is there, in shape)
    with exit 0; the extra blocks inside resnet18's stages now say which architecture the file is."""
    torch.save(_random_state("resnet34"), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match=r"trunk tensor\(s\) resnet18 does not have") as err:
        build_encoder(encoder_id, weights=tmp_path / "r34.pth")
    assert "layer1.2.conv1.weight" in str(err.value)
    assert "looks like a resnet34 checkpoint" in str(err.value)
    encoder = build_encoder("resnet34@layer2+r34", weights=tmp_path / "r34.pth")  # later stages: fine
    assert {k.split(".")[0] for k in encoder.unused_keys} == {"layer3", "layer4", "fc"}


def test_user_weights_never_land_under_the_default_id(tmp_path):
    torch.save(_random_state("resnet18"), tmp_path / "mine.pth")
    with pytest.raises(
        WeightsError, match=r"stored under resnet18@layer3, .* --encoder resnet18@layer3\+mine"
    ):
        build_encoder("resnet18@layer3", weights=tmp_path / "mine.pth")
    with pytest.raises(ValidationError, match=r"name them with a tag, e.g. id: resnet18\+mine"):
        EncoderConfig(id="resnet18", weights=str(tmp_path / "mine.pth"))
    assert EncoderConfig(id="resnet18", weights="timm").weights == "timm"  # its default, named


# ---- the offline ImageNet weights are real ---------------------------------------------------------


def _center_tile(image: np.ndarray, size: int = 224) -> torch.Tensor:
    im = Image.fromarray(image)
    scale = 256 / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    tile = np.asarray(im.crop((left, top, left + size, top + size)))
    return torch.from_numpy(tile.copy()).permute(2, 0, 1)[None]  # (1, 3, 224, 224) uint8


def test_efficientnet_lite0_imagenet_weights_classify_real_photos():
    encoder = build_encoder("efficientnet_lite0")  # default weights: the registry package
    full = timm.create_model("efficientnet_lite0", num_classes=1000).state_dict()
    head = map_to_model(read_checkpoint(fetch_asset("efficientnet_lite0_imagenet")), full)
    with torch.no_grad():
        for image, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), [967])):
            features = encoder.module(_center_tile(image))  # (1, 1280)
            logits = features @ head["classifier.weight"].T + head["classifier.bias"]
            assert int(logits.argmax()) in classes


@pytest.mark.slow
def test_the_registrys_static_cut_points_are_the_models():
    # config validation reads the torch-free catalogue; the models must have exactly those cut points
    from histotransfer.features.encoders import trunk_cut_points

    for arch in ARCHS:
        assert list_cut_points(arch) == trunk_cut_points(arch), arch
