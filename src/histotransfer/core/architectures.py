"""The encoder architectures an id may name: a catalogue of plain data. Torch-free.

One ``ArchSpec`` per architecture: how timm builds it, where its weights come from, how its authors feed
it, and its cut points (the blocks an id's ``@CUT`` may name; a test checks that they equal the cut points
of its timm model). Validating a config reads this without importing torch or timm; building an encoder
is histotransfer.features.encoders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from histotransfer.core.errors import ConfigError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

# How a transformer's tokens become one embedding (``TOKEN_RULES``; CNNs always average-pool):
#   cls       the class token, after the final norm
#   cls+mean  the class token concatenated with the mean of the patch tokens (registers excluded)
#   mean      the mean of the patch tokens (Swin: of the last stage's grid), after the final norm
#   attn_pool CONCH's attentional pooler (one learned query over all tokens) and its LayerNorm
TOKEN_RULES = ("gap", "cls", "cls+mean", "mean", "attn_pool")
FAMILIES = ("cnn", "vit", "swin")


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture with timm, where its weights come from and how its authors
    feed it (normalisation, input size, magnification, which tokens make the embedding)."""

    timm_name: str
    # "timm" (timm's pretrained tag), "asset:NAME" (a registry package), "hf-hub:ORG/NAME" (a
    # foundation model's hub repository: used only when asked for) or "file:WHAT" (no hub copy)
    default_weights: str
    flatten: tuple[str, ...] = ()  # sequential containers whose children are cut points
    family: str = "cnn"  # cnn: a chain of modules; vit: patch embedding + blocks; swin: stages
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    cuts: tuple[str, ...] = ()  # the cut points, in forward order; equal to the timm model's (tested)
    dim: int | None = None  # the embedding's width (transformers: at every cut; CNNs: of the full net)
    token: str = "gap"  # a TOKEN_RULES entry
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std); None: timm's
    input_size: int | None = None  # None: timm's; transformers always get tiles resized to it
    mpp: float | None = None  # the resolution its authors extract tiles at (um/px)
    layout: str = "timm"  # the key layout its published checkpoint uses (features.weights.LAYOUTS)
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # on the hub, in order
    small: dict[str, Any] = field(default_factory=dict)  # create_kwargs of a shrunk copy (tests)
    source: str = ""  # where the architecture's details were checked

    def __post_init__(self) -> None:
        if (
            self.family not in FAMILIES
            or self.token not in TOKEN_RULES
            or (self.token == "gap") != (self.family == "cnn")
        ):
            raise ValueError(f"{self.timm_name}: family {self.family!r} with token rule {self.token!r}")

    @property
    def sequential(self) -> bool:
        """The trunk is a chain of modules (CNNs), cut by running its first modules."""
        return self.family == "cnn"

    @property
    def published_file(self) -> bool:
        """A foundation model: its weights are a file its authors publish (most behind a licence
        click on a hub). The user's copy of that file is given under the plain id, and read offline;
        the hub is asked only when the weights say ``hf-hub:``."""
        return self.default_weights.startswith(("hf-hub:", "file:"))


def numbered_blocks(n: int) -> tuple[str, ...]:
    return tuple(f"blocks.{i}" for i in range(n))


_RESNET = ("layer1", "layer2", "layer3", "layer4")
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}  # resolved to timm classes when built
_SMALL_VIT = {"embed_dim": 48, "depth": 3, "num_heads": 3}  # 48: every SwiGLU width stays even


def _vit(timm_name: str, default_weights: str, *, depth: int, **fields: Any) -> ArchSpec:
    """A ViT foundation model, every block a cut point; by default its embedding is the class token of
    224 px tiles at 0.5 um/px and its test copy is _SMALL_VIT (``fields`` override and add)."""
    usual = {"token": "cls", "input_size": 224, "mpp": 0.5, "small": _SMALL_VIT}
    return ArchSpec(
        timm_name, default_weights, family="vit", cuts=numbered_blocks(depth), **{**usual, **fields}
    )


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("resnet18", "timm", description="ImageNet ResNet18 (paper)", cuts=_RESNET, dim=512),
    "resnet34": ArchSpec("resnet34", "timm", description="ImageNet ResNet34 (paper)", cuts=_RESNET, dim=512),
    "resnet50": ArchSpec(
        "resnet50", "timm", description="ImageNet ResNet50 (paper; @layer3 is CLAM's)", cuts=_RESNET, dim=2048
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
        dim=1024,
    ),
    "efficientnet_lite0": ArchSpec(
        "efficientnet_lite0",
        "asset:efficientnet_lite0_imagenet",
        flatten=("blocks",),
        description="ImageNet EfficientNet-Lite0 (weights from a registry package: works offline)",
        cuts=(*(f"blocks.{i}" for i in range(7)), "conv_head", "bn2"),
        dim=1280,
    ),
    # ---- pathology foundation models --------------------------------------------------------------
    # RetCCL (Wang et al. 2023, MedIA): a torchvision ResNet50 (github.com/Xiyue-Wang/RetCCL,
    # ResNet.py; best_ckpt.pth, fc replaced by a projection head); tiles at 1 um/px as the authors'
    # CTransPath (not stated in a config file).
    "retccl": ArchSpec(
        "resnet50",
        "file:best_ckpt.pth from github.com/Xiyue-Wang/RetCCL",
        description="RetCCL, ResNet50 trained by clustering-guided contrastive learning on TCGA+PAIP",
        cuts=_RESNET,
        dim=2048,
        norm=IMAGENET,
        input_size=224,
        mpp=1.0,
        layout="torchvision",
        source="github.com/Xiyue-Wang/RetCCL",
    ),
    # CTransPath (Wang et al. 2022, MedIA): Swin-T with a convolutional stem (TransPath ctran.py,
    # timm 0.5.4 Swin layout, ctranspath.pth; TRIDENT's ctranspath entry: 768-d, 224 px, mag 10).
    "ctranspath": ArchSpec(
        "swin_tiny_patch4_window7_224",
        "file:ctranspath.pth from github.com/Xiyue-Wang/TransPath",
        family="swin",
        description="CTransPath, Swin-T with a conv stem, semantically-relevant contrastive learning",
        cuts=("layers.0", "layers.1", "layers.2", "layers.3"),
        dim=768,
        token="mean",
        norm=IMAGENET,
        input_size=224,
        mpp=1.0,
        layout="ctranspath",
        small={"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        source="github.com/Xiyue-Wang/TransPath ctran.py; TRIDENT load.py",
    ),
    # UNI (Chen et al. 2024): hf.co/MahmoodLab/UNI model card: timm vit_large_patch16_224,
    # init_values 1e-5, dynamic_img_size; ImageNet normalisation, 224 px at 20x, CLS token.
    "uni": _vit(
        "vit_large_patch16_224",
        "hf-hub:MahmoodLab/uni",
        create_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        description="UNI, ViT-L/16, DINOv2 on 100k slides (Mass-100K)",
        depth=24,
        dim=1024,
        norm=IMAGENET,
        hub_files=("pytorch_model.bin",),
        source="hf.co/MahmoodLab/UNI model card",
    ),
    # UNI2-h: hf.co/MahmoodLab/UNI2-h model card: vit_giant_patch14_224, img 224, patch 14, depth 24,
    # 24 heads, width 1536, mlp_ratio 2.66667*2, SwiGLUPacked + SiLU, 8 registers, no_embed_class.
    "uni2_h": _vit(
        "vit_giant_patch14_224",
        "hf-hub:MahmoodLab/UNI2-h",
        create_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        description="UNI2-h, ViT-H/14 (681M) with 8 registers, on 350k slides",
        depth=24,
        dim=1536,
        norm=IMAGENET,
        hub_files=("pytorch_model.bin",),
        source="hf.co/MahmoodLab/UNI2-h model card; TRIDENT load.py",
    ),
    # CONCH (Lu et al. 2024): github.com/mahmoodlab/CONCH conch_ViT-B-16.json and vision_tower.py: a timm
    # ViT-B/16 trunk at 448 px, attentional pooler (512-d, 8 heads, 1 query) + LayerNorm; the
    # embedding is encode_image(proj_contrast=False, normalize=False); OpenAI CLIP normalisation.
    "conch": _vit(
        "vit_base_patch16_224",
        "hf-hub:MahmoodLab/CONCH",
        create_kwargs={"img_size": 448, "dynamic_img_size": True, "pool_dim": 512, "pool_heads": 8},
        description="CONCH vision tower, ViT-B/16 at 448 px (vision-language, 1.17M image-caption pairs)",
        depth=12,
        dim=512,
        token="attn_pool",
        norm=OPENAI_CLIP,
        input_size=448,
        layout="conch",
        hub_files=("pytorch_model.bin",),
        small={**_SMALL_VIT, "pool_dim": 16, "pool_heads": 2},
        source="github.com/mahmoodlab/CONCH conch_ViT-B-16.json, vision_tower.py",
    ),
    # Virchow2 (Zimmermann et al. 2024): hf.co/paige-ai/Virchow2 model card: vit_huge_patch14_224,
    # img 224, init_values 1e-5, mlp_ratio 5.3375, SwiGLUPacked + SiLU, 4 registers; embedding =
    # CLS concatenated with the mean of the 256 patch tokens (registers 1-4 excluded): 2560-d.
    "virchow2": _vit(
        "vit_huge_patch14_224",
        "hf-hub:paige-ai/Virchow2",
        create_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        description="Virchow2, ViT-H/14 with 4 registers, on 3.1M slides",
        depth=32,
        dim=2560,
        token="cls+mean",
        norm=IMAGENET,
        source="hf.co/paige-ai/Virchow2 model card; TRIDENT load.py",
    ),
    # H-optimus-0 / -1 (Bioptimus): hf.co/bioptimus/H-optimus-0 model card: timm
    # vit_giant_patch14_reg4_dinov2, img 224, init_values 1e-5; their own normalisation; 0.5 um/px.
    "h_optimus_0": _vit(
        "vit_giant_patch14_reg4_dinov2",
        "hf-hub:bioptimus/H-optimus-0",
        create_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        description="H-optimus-0, ViT-g/14 (1.1B) with 4 registers, on 500k slides",
        depth=40,
        dim=1536,
        norm=BIOPTIMUS,
        source="hf.co/bioptimus/H-optimus-0 model card",
    ),
    "h_optimus_1": _vit(
        "vit_giant_patch14_reg4_dinov2",
        "hf-hub:bioptimus/H-optimus-1",
        create_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        description="H-optimus-1, ViT-g/14 (1.1B) with 4 registers, on 1M+ slides",
        depth=40,
        dim=1536,
        norm=BIOPTIMUS,
        source="hf.co/bioptimus/H-optimus-1 model card",
    ),
    # Prov-GigaPath tile encoder (Xu et al. 2024): hf.co/prov-gigapath/prov-gigapath config.json:
    # vit_giant_patch14_dinov2 architecture with patch 16, width 1536, depth 40, 24 heads,
    # mlp_ratio 5.33334, init_values 1e-5, img 224; ImageNet normalisation; CLS token; 0.5 um/px.
    "gigapath": _vit(
        "vit_giant_patch14_dinov2",
        "hf-hub:prov-gigapath/prov-gigapath",
        create_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "init_values": 1e-5,
            "dynamic_img_size": True,
        },
        description="Prov-GigaPath tile encoder, ViT-g/16 (1.1B), on 171k slides",
        depth=40,
        dim=1536,
        norm=IMAGENET,
        hub_files=("pytorch_model.bin",),
        source="hf.co/prov-gigapath/prov-gigapath config.json; TRIDENT load.py",
    ),
    # Phikon (Filiot et al. 2023): hf.co/owkin/phikon, a Hugging Face ViTModel (ViT-B/16, iBOT on
    # 40M TCGA tiles); embedding = last_hidden_state[:, 0] (CLS after the final LayerNorm).
    "phikon": _vit(
        "vit_base_patch16_224",
        "hf-hub:owkin/phikon",
        create_kwargs={"dynamic_img_size": True},
        description="Phikon, ViT-B/16 (iBOT) on 6k TCGA slides",
        depth=12,
        dim=768,
        norm=IMAGENET,
        layout="hf_vit",
        source="hf.co/owkin/phikon config.json (ViTModel); TRIDENT load.py",
    ),
    # Phikon-v2 (Filiot et al. 2024): hf.co/owkin/phikon-v2, a Hugging Face Dinov2Model (ViT-L/16,
    # layerscale 1e-5, image 224); embedding = last_hidden_state[:, 0].
    "phikon_v2": _vit(
        "vit_large_patch16_224",
        "hf-hub:owkin/phikon-v2",
        create_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        description="Phikon-v2, ViT-L/16 (DINOv2) on 58k slides (PANCAN-XL)",
        depth=24,
        dim=1024,
        norm=IMAGENET,
        layout="hf_dinov2",
        source="hf.co/owkin/phikon-v2 config.json (Dinov2Model); TRIDENT load.py",
    ),
    # Hibou-B / Hibou-L (Nechaev et al. 2024): hf.co/histai/hibou-b and hibou-L, DINOv2 with 4 register
    # tokens, layer scale 1e-5 and a SwiGLU MLP (github.com/HistAI/hibou, hibou/models/__init__.py
    # build_model: patch 14, img 224, ffn "swiglufused": hidden (4d * 2/3 + 7) // 8 * 8, packed);
    # their own normalisation; embedding = pooler_output (CLS after the final LayerNorm).
    "hibou_b": _vit(
        "vit_base_patch14_reg4_dinov2",
        "hf-hub:histai/hibou-b",
        create_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3334,  # timm's int(768 * r) = 4096 = 2 x 2048, DINOv2's SwiGLU width
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        description="Hibou-B, ViT-B/14 (DINOv2) with 4 registers, on 1.1M slides",
        depth=12,
        dim=768,
        norm=HIBOU,
        layout="hf_dinov2",
        source="github.com/HistAI/hibou build_model; hf.co/histai/hibou-b; TRIDENT constants.py",
    ),
    "hibou_l": _vit(
        "vit_large_patch14_reg4_dinov2",
        "hf-hub:histai/hibou-L",
        create_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.34375,  # int(1024 * r) = 5472 = 2 x 2736, DINOv2's SwiGLU width
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        description="Hibou-L, ViT-L/14 (DINOv2) with 4 registers, on 1.1M slides",
        depth=24,
        dim=1024,
        norm=HIBOU,
        layout="hf_dinov2",
        source="github.com/HistAI/hibou build_model; hf.co/histai/hibou-L; TRIDENT load.py",
    ),
    # Kaiko (Aben et al. 2024, "Towards large-scale training of pathology foundation models"):
    # timm checkpoints at hf.co/1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms
    # (and vit_base_patch8_224...); normalisation 0.5/0.5; CLS token (timm's num_classes=0 pooling).
    "kaiko_vits16": _vit(
        "vit_small_patch16_224",
        "hf-hub:1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms",
        create_kwargs={"dynamic_img_size": True},
        description="Kaiko ViT-S/16 (DINO) on TCGA",
        depth=12,
        dim=384,
        norm=KAIKO,
        source="TRIDENT load.py (Kaiko entries) and constants.py",
    ),
    "kaiko_vitb8": _vit(
        "vit_base_patch8_224",
        "hf-hub:1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms",
        create_kwargs={"dynamic_img_size": True},
        description="Kaiko ViT-B/8 (DINO) on TCGA",
        depth=12,
        dim=768,
        norm=KAIKO,
        source="TRIDENT load.py (Kaiko entries) and constants.py",
    ),
    # Lunit (Kang et al. 2023, "Benchmarking self-supervised learning on diverse pathology datasets"):
    # timm vit_small_patch8_224 (DINO) at hf.co/1aurent/vit_small_patch8_224.lunit_dino; Lunit's
    # normalisation (github.com/lunit-io/benchmark-ssl); CLS token.
    "lunit_vits8": _vit(
        "vit_small_patch8_224",
        "hf-hub:1aurent/vit_small_patch8_224.lunit_dino",
        create_kwargs={"dynamic_img_size": True},
        description="Lunit ViT-S/8 (DINO) on 33M tiles",
        depth=12,
        dim=384,
        norm=LUNIT,
        source="github.com/lunit-io/benchmark-ssl; TRIDENT load.py",
    ),
}


def list_cut_points(arch: str) -> list[str]:
    """Block boundaries the network can be cut after (layer1..4, denseblock1, transition1, blocks.3)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return list(ARCHS[arch].cuts)
