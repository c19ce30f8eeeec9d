"""The one configuration schema (validated at the edge) shared by `histotransfer run`, the per-stage
commands, DVC's params.yaml and the KFP pipelines. Every default lives here and only here.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from histotransfer.core.encoder_ids import EncoderId, parse_encoder_id, untagged_weights_ok
from histotransfer.core.errors import ConfigError

# ---- bounded echoes of user input: an error message never prints a value whole ---------------------


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() of a huge int is slow, and over 4300 digits an error
            return f"<an integer of about {round(x.bit_length() * 0.30103):,} digits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to a short line: a string of up to ``limit`` characters whole, a longer one
    to its ends, a list to its first items."""
    if isinstance(value, str) and len(value) <= limit:
        return repr(value)
    return _REPR.repr(value)


def short_text(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most about ``limit`` characters (its start and end kept)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit * 2 // 3]} ... {text[-limit // 3 :]}"


# ---- YAML: the one loader of configs, --set and --param values --------------------------------------

MAX_YAML_VALUES = 100_000  # a config holds a few hundred values: more can only come from alias bombs
MAX_YAML_DEPTH = 32  # a config nests sections four deep
MAX_CONFIG_BYTES = 1 << 20  # params.yaml is 2 KB


class _YamlDocumentError(Exception):
    """What is wrong with a YAML document, said of it ("it has ..."), for load_yaml's ConfigError."""


def _at(mark: yaml.Mark | None) -> str:
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key twice in one mapping (PyYAML keeps the last silently), and
    naming the line of a value its constructor cannot make (``!!int abc``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: the keys written beside it override the merged ones
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable: the base constructor says so, with its line
                second = key_node.start_mark
                if first is None:
                    seen[key] = second
                else:
                    if first is second:  # one aliased key node, used twice
                        where = f"line {first.line + 1}, twice through aliases"
                    elif first.line == second.line:
                        where = f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
                    else:
                        where = f"lines {first.line + 1} and {second.line + 1}"
                    raise _YamlDocumentError(
                        f"has the key {short_repr(key)} twice in one mapping ({where}): keep one "
                        "(YAML would silently use the last)"
                    )
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            # e.g. `!!int abc`, `!!bool maybe`, `!!timestamp x`, an integer of 5000 digits
            tag = node.tag.rsplit(":", 1)[-1]
            raise _YamlDocumentError(
                f"has a value{_at(node.start_mark)} that is not a valid {tag} ({short_text(str(exc), 120)})"
            ) from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that loops, nests too deep or expands (through aliases, which share nodes)
    to more than MAX_YAML_VALUES values: sizes are counted once per node, so an alias bomb costs its
    node count, not its expansion."""
    size: dict[int, int] = {}  # id(node) -> values it expands to (capped just above the limit)
    height: dict[int, int] = {}
    entered: set[int] = set()  # the nodes on the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _children(node)
        if done:
            entered.discard(key)
            size[key] = min(MAX_YAML_VALUES + 1, 1 + sum(size[id(k)] for k in kids))
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            if height[key] > MAX_YAML_DEPTH:
                raise _YamlDocumentError(
                    f"nests lists and mappings more than {MAX_YAML_DEPTH} levels deep{_at(node.start_mark)}"
                )
            continue
        if key in size:
            continue
        entered.add(key)
        stack.append((node, True))
        for kid in kids:
            if id(kid) in entered:
                raise _YamlDocumentError(
                    f"has an alias inside the list or mapping it refers to (anchored{_at(kid.start_mark)}): "
                    "YAML aliases must not loop"
                )
            if id(kid) not in size:
                stack.append((kid, False))
    if size[id(root)] > MAX_YAML_VALUES:
        raise _YamlDocumentError(
            f"expands to more than {MAX_YAML_VALUES:,} values through YAML aliases (anchors `&` reused "
            "with `*`): write the values out"
        )


def load_yaml(text: str, *, source: str, syntax_hint: str = "") -> Any:
    """The one YAML document in ``text`` with safe types only (None when empty); a ConfigError
    "cannot read {source}: it ..." names the line of a syntax error, a key given twice in one mapping,
    and refuses alias bombs, loops and deep nesting. ``syntax_hint`` follows a syntax error's message."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses characters YAML does not allow, at once
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except _YamlDocumentError as exc:
        raise ConfigError(f"cannot read {source}: it {exc}") from None
    except yaml.MarkedYAMLError as exc:
        problem = short_text(exc.problem or exc.context or "", 200)
        raise ConfigError(
            f"cannot read {source}: it is not valid YAML{_at(exc.problem_mark or exc.context_mark)} "
            f"({problem}){syntax_hint}"
        ) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"cannot read {source}: it is not valid YAML at line {line} (character {exc.character:#06x} "
            "is not allowed in YAML text)"
        ) from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise ConfigError(
            f"cannot read {source}: it nests lists and mappings more than {MAX_YAML_DEPTH} levels deep"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: str | Path, *, what: str = "config") -> Any:
    """``load_yaml`` of a UTF-8 file of at most MAX_CONFIG_BYTES; errors say "cannot read {what} {path}"."""
    source = f"{what} {path}"
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"cannot read {source}: it is {size:,} bytes, and a config is a few KB (at most "
                f"{MAX_CONFIG_BYTES:,}): is it the right file?"
            )
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {source}: {short_text(str(exc), 200)}") from None
    return load_yaml(text, source=source)


# ---- the schema -------------------------------------------------------------------------------------

SEED_MAX = 2**31 - 1  # seeds go to numpy, torch and scikit-learn (< 2**32), with seed + repeat added
# Microns per pixel: microscopy lives well inside this range; values outside it are defaults of image
# tools (72 dpi is 352.8 um/px) or corrupt metadata: a slide's are then no resolution at all
# (wsi.slides), a manifest's or config's an error.
PLAUSIBLE_MPP = (0.01, 100.0)


def _plausible_mpp(mpp: float) -> float:
    low, high = PLAUSIBLE_MPP
    if not low <= mpp <= high:
        raise ValueError(f"um/px must be within {low:g} to {high:g} (the resolutions the tiler accepts)")
    return mpp


Mpp = Annotated[float, AfterValidator(_plausible_mpp)]  # microns per pixel a slide can have
Width = Annotated[int, Field(ge=1, le=8192)]  # units of a network layer


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TissueConfig(_Section):
    """Tissue detection on a low-resolution image (Otsu on saturation, then morphology)."""

    mask_mpp: Mpp = Field(8.0, description="resolution the mask is computed at, um/px")
    saturation_threshold: int | None = Field(None, ge=0, le=255, description="None: Otsu")
    min_saturation: int = Field(20, ge=0, le=255, description="floor for Otsu's threshold")
    median_size_px: int = Field(5, ge=1, le=255, description="median filter side on the mask image")
    closing_radius_um: float = Field(16.0, ge=0, le=1_000, description="morphological closing radius, um")
    min_object_um2: float = Field(10_000.0, ge=0, le=1e8, description="1e8 um^2: a square centimetre")
    min_hole_um2: float = Field(10_000.0, ge=0, le=1e8, description="holes smaller than this are filled")
    pen_hue_deg: tuple[float, float] | None = Field(
        (60.0, 245.0), description="hues of marker ink (blue, green) dropped from the tissue; None: keep"
    )

    @field_validator("pen_hue_deg")
    @classmethod
    def _hue_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1] <= 360:
            raise ValueError(f"needs 0 <= low <= high <= 360 degrees, got [{value[0]:g}, {value[1]:g}]")
        return value


class TilingConfig(_Section):
    target_mpp: Mpp = Field(0.5, description="resolution of the tiles, um/px")
    patch_size_px: int = Field(224, ge=16, le=4096, description="tile side in pixels at target_mpp")
    overlap: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of a tile shared by neighbours")
    min_tissue_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="tissue share a tile needs to be kept"
    )
    max_od_ratio: float | None = Field(
        2.2,
        gt=1.0,
        le=100.0,
        description="drop tiles darker than this times the slide's median tile (folds); None: keep",
    )
    max_saturation_ratio: float | None = Field(
        1.5,
        gt=1.0,
        le=100.0,
        description="drop tiles more saturated than this times the slide's median tile (folds); None: keep",
    )
    mpp_tolerance: float = Field(0.1, ge=0.0, le=1.0, description="see docs/adr/0001")
    qc_image: bool = Field(True, description="write the QC picture tiles/{slide_id}.png")
    qc_max_side_px: int = Field(1200, ge=64, le=16_384, description="QC picture's longest side, at most")
    tissue: TissueConfig = Field(TissueConfig(), description="tissue detection")


class SampleDataConfig(_Section):
    """The embedded sample cohort, built from real H&E pixels (see histotransfer.wsi.sample_data and
    docs/study.md, "The sample cohort"). The defaults make a cohort on which encoders can differ."""

    enabled: bool = Field(True, description="build it when no manifest is given")
    n_slides: int = Field(24, ge=2, le=1_000, description="slides in the cohort")
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="slides with a lesion")
    lesion_types: list[Literal["solid", "papillary"]] = Field(  # sample_data.LESION_SOURCES
        default_factory=lambda: ["solid"],
        min_length=1,
        description="one class per type besides normal: a single type is labelled `tumor`, several "
        "`tumor-{type}`",
    )
    lesion_fraction: tuple[float, float] = Field(
        (0.01, 0.1), description="lesion area / tissue area of a lesional slide: log-uniform in [low, high]"
    )
    tissue_pieces: int = Field(4, ge=1, le=64, description="tissue pieces per slide")
    sites: int = Field(3, ge=1, le=32, description="scanning sites, each with its own stain, focus, JPEG")
    site_mpp: list[float] = Field(
        default_factory=lambda: [0.5, 0.25],
        min_length=1,
        max_length=32,
        description="level-0 um/px of the sites' scanners, assigned in turn (0.5: 20x, 0.25: 40x)",
    )
    variation: float = Field(
        1.0, ge=0.0, le=2.0, description="strength of stain, focus and JPEG differences (0: none)"
    )
    artefacts: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="chance per slide of each artefact: pen mark, tissue fold, air bubble",
    )
    slides_per_patient: int = Field(
        1,
        ge=1,
        le=8,
        description="slides per patient, of one site and label (1: each slide its own patient)",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the cohort's slides and labels")

    @field_validator("lesion_fraction", mode="before")
    @classmethod
    def _scalar_is_a_point(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) == 1:
            value = value[0]
        return (value, value) if isinstance(value, int | float) else value

    @field_validator("lesion_fraction")
    @classmethod
    def _ordered_fractions(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high < 1:
            raise ValueError(f"needs 0 < low <= high < 1, got [{low}, {high}]")
        return value

    @field_validator("site_mpp")
    @classmethod
    def _plausible_mpp(cls, value: list[float]) -> list[float]:
        if any(not 0.1 < mpp <= 2.0 for mpp in value):
            raise ValueError(f"each scanner's um/px must be in (0.1, 2.0], got {short_repr(value)}")
        return value

    @field_validator("lesion_types")
    @classmethod
    def _unique_types(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lesion types must be unique, got {short_repr(value)}")
        return value


class EncoderConfig(_Section):
    """One encoder of the study: ``ARCH[@CUT][+WEIGHTS]`` (see `histotransfer encoders`)."""

    id: str = Field(description="ARCH[@CUT][+WEIGHTS], see `histotransfer encoders`")
    weights: str | None = Field(None, description="checkpoint file, hf-hub:ORG/NAME or timm; None: per id")

    @field_validator("id")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        return str(parse_encoder_id(value))

    @model_validator(mode="after")
    def _tagged_weights(self) -> EncoderConfig:
        enc = parse_encoder_id(self.id)
        if self.weights and enc.tag is None and not untagged_weights_ok(enc.arch, self.weights):
            raise ValueError(
                f"weights {self.weights} for {enc}: features would be stored under the id of its default "
                f"weights; name them with a tag, e.g. id: {EncoderId(enc.arch, enc.cut, 'mine')}"
            )
        return self


# The demo's encoders: real ImageNet weights (they ship in a registry package, so this runs offline),
# the paper's truncation study on them, and a random-init baseline.
DEMO_ENCODERS = (
    "efficientnet_lite0",
    "efficientnet_lite0@blocks.5",
    "efficientnet_lite0@blocks.3",
    "efficientnet_lite0@blocks.1",
    "efficientnet_lite0+random",
)


class ExtractionConfig(_Section):
    encoders: list[EncoderConfig] = Field(
        default_factory=lambda: [EncoderConfig(id=i) for i in DEMO_ENCODERS],
        min_length=1,
        description="the encoders whose features the study compares",
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ...")
    batch_size: int | None = Field(None, ge=1, le=4096, description="None: 256 on GPU, 32 on CPU")
    num_workers: int | None = Field(
        None,
        ge=0,
        le=256,
        description="tile readers: DataLoader workers on a GPU, threads on the CPU (0: none, the model's "
        "thread reads); None: one per core (max 16) on a GPU, a split of the cores measured on each slide "
        "on the CPU",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 with torch on a GPU, else fp32"
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="auto: torch on GPU, ONNX Runtime on CPU (faster there)"
    )

    def weights_for(self, encoder_id: str | None) -> str | None:
        """The weights this section gives ``encoder_id`` (None: not listed, or its default weights)."""
        return next((e.weights for e in self.encoders if e.id == encoder_id), None)

    @field_validator("encoders")
    @classmethod
    def _unique(cls, value: list[EncoderConfig]) -> list[EncoderConfig]:
        ids = [e.id for e in value]
        if dupes := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(
                f"encoder ids must be unique (they name output folders): {short_text(', '.join(dupes))}"
            )
        return value


# The MIL heads (histotransfer.mil.model builds them; docs/study.md, Aggregators)
Aggregator = Literal["abmil", "gated", "clam_sb", "transmil", "mean", "max"]
AGGREGATORS: tuple[str, ...] = get_args(Aggregator)


class MILConfig(_Section):
    """Attention-MIL head and its training (defaults: the paper)."""

    aggregator: Aggregator = Field(
        "abmil",
        description="the MIL head: abmil (the paper's attention), gated, clam_sb, transmil, or the pooling "
        "baselines mean and max (docs/study.md, Aggregators)",
    )
    compare: list[Aggregator] = Field(
        default_factory=list,
        description="more heads cross-validated on each frozen encoder's features beside mil.aggregator "
        "(same folds and seeds): the report's encoder x aggregator table",
    )
    hidden_dims: tuple[Width, Width] = Field((256, 64), description="widths of the two feature layers")
    attention_dim: Width = Field(32, description="width of the attention layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each feature layer")
    beta: float = Field(
        0.0, ge=0.0, le=100.0, description="weight of the patch-level auxiliary loss; 0: no patch head"
    )
    lr: float = Field(1e-3, gt=0, le=10.0, description="learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0, le=10.0, description="Adam's weight decay")
    epochs: int = Field(20, ge=1, le=10_000, description="epochs per fold")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over the steps")
    standardize: bool = Field(
        True, description="z-score features by the fold's training tiles (folded into the saved head)"
    )
    restarts: int = Field(
        3, ge=1, le=100, description="initialisations per fold; the best by selection loss is kept"
    )
    selection: Literal["last", "val_loss"] = Field(
        "last",
        description="last: fit on all training patients, keep the last epoch (the paper); val_loss: hold "
        "out val_fraction of them and keep the epoch with the lowest validation loss",
    )
    folds: int = Field(
        5, ge=2, le=100, description="cross-validation folds (ignored when the manifest has `split`)"
    )
    val_fraction: float = Field(
        0.2, gt=0.0, lt=0.5, description="of each fold's training patients, with selection: val_loss"
    )
    seeds: int = Field(
        1,
        ge=1,
        le=100,
        description="cross-validation repeats (seed, seed+1, ...); the report shows their spread",
    )
    class_weighting: bool = Field(True, description="weight the loss by inverse class frequency")
    max_loss: float = Field(1e3, gt=0, le=1e9, description="a loss above this (or NaN) stops training")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the folds, initialisations and bootstrap")
    bag_cache_gb: float = Field(4.0, ge=0, le=4096, description="features kept in memory between epochs")

    @model_validator(mode="after")
    def _distinct_heads(self) -> MILConfig:
        heads = [self.aggregator, *self.compare]
        if len(set(heads)) < len(heads):
            raise ValueError(
                f"mil.compare {self.compare} repeats a head (mil.aggregator is {self.aggregator}): name "
                "each other head once"
            )
        return self

    def head(self, kind: str) -> MILConfig:
        """These settings with ``kind`` as the head and nothing to compare: one of compare's runs."""
        return self.model_copy(update={"aggregator": kind, "compare": []})

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "attention" in data:
            raise ValueError(
                "mil.attention was renamed mil.aggregator (paper -> abmil, gated -> gated); "
                f"write aggregator: {'gated' if data['attention'] == 'gated' else 'abmil'}"
            )
        return data

    @property
    def holdout_fraction(self) -> float:
        """The share of each fold's training patients held out for model selection (0: none)."""
        return self.val_fraction if self.selection == "val_loss" else 0.0


class FinetuneConfig(_Section):
    """Attention top-k fine-tuning (defaults: the paper; the demo config shrinks k and epochs)."""

    encoders: list[str] = Field(
        default_factory=list, description="encoder ids to fine-tune (from extraction)"
    )
    k: int = Field(
        64, ge=1, le=10_000, description="tiles per slide, by attention of the fold's frozen MIL model"
    )
    selection: Literal["attention", "random"] = Field("attention", description="random: the baseline")
    epochs: int = Field(20, ge=1, le=10_000, description="fine-tuning epochs per fold")
    lr: float = Field(1e-5, gt=0, le=10.0, description="encoder learning rate (Adam)")
    head_lr: float | None = Field(None, gt=0, le=10.0, description="attention head learning rate; None: lr")
    freeze_blocks: int = Field(
        0,
        ge=0,
        le=1_000,
        description="freeze the stem and the first N blocks (ViTs: patch embedding, tokens, blocks)",
    )
    grad_checkpointing: bool | None = Field(
        None, description="recompute block activations in the backward pass; null: on from 300M parameters"
    )
    augment: bool = Field(False, description="random flips and 90-degree rotations")
    accumulate: int = Field(
        1, ge=1, le=10_000, description="slides per optimiser step (gradient accumulation)"
    )
    patience: int | None = Field(
        5, ge=1, le=10_000, description="stop after this many epochs without a better val loss"
    )
    class_weighting: bool = Field(True, description="weight the loss by inverse class frequency")
    max_loss: float = Field(1e3, gt=0, le=1e9, description="a loss above this (or NaN) stops training")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of tile sampling, order and augmentation")

    @field_validator("encoders", mode="before")
    @classmethod
    def _known_encoders(cls, value: Any) -> Any:
        """Ids as text or as ``{id: ...}`` (the form dvc.yaml's foreach needs: it names stages by
        list values, and an id's ``@`` would break the name)."""
        if not isinstance(value, list):
            return value
        ids = [v.get("id") if isinstance(v, dict) and set(v) == {"id"} else v for v in value]
        return [str(parse_encoder_id(v)) if isinstance(v, str) else v for v in ids]


class CKAConfig(_Section):
    """Frozen vs fine-tuned representations, layer by layer (runs for every fine-tuned encoder)."""

    tiles: int = Field(256, ge=8, le=1_000_000, description="tiles sampled from the cohort's tiles files")
    batch_size: int = Field(64, ge=4, le=4096, description="minibatch of the unbiased-HSIC estimator")
    fold: int = Field(0, ge=0, lt=100, description="which fold's fine-tuned encoder to compare")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the tile sample")


class ExportConfig(_Section):
    """The deployable model `run` exports: the best encoder of the study with one fold's MIL head."""

    enabled: bool = Field(True, description="export the best model after the study")
    name: str = Field(
        "best", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$", max_length=100, description="writes onnx/NAME/"
    )
    fold: int | None = Field(None, ge=0, lt=100, description="None: the fold with the lowest validation loss")
    fp16: bool = Field(False, description="float16 encoder for GPUs (parity tolerance 1e-2)")


class EvaluationConfig(_Section):
    bootstrap: int = Field(
        1000, ge=100, le=100_000, description="bootstrap resamples for confidence intervals"
    )
    ci: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the intervals")
    heatmaps: int = Field(8, ge=0, le=10_000, description="attention heatmaps drawn per encoder")
    lesion_tile_fraction: float = Field(0.5, gt=0, le=1, description="a tile is lesion when this much is")
    cv: Literal["patient", "site"] = Field(
        "patient",
        description="patient: patient-grouped folds; site: also one fold per held-out scanning site "
        "(the manifest's site column), reported as in-site vs out-of-site AUC",
    )


class StudyConfig(_Section):
    """The whole study. Its defaults are the embedded demo."""

    output_dir: Path = Field(
        Path("runs/demo"), description="the study's folder (gs://BUCKET/FOLDER: on the command line only)"
    )
    manifest: Path | None = Field(None, description="cohort manifest; None: use the sample cohort")
    sample_data: SampleDataConfig = Field(SampleDataConfig(), description="the sample cohort")
    tiling: TilingConfig = Field(TilingConfig(), description="tiles and their tissue filter")
    extraction: ExtractionConfig = Field(  # lazy: ids import torch
        default_factory=ExtractionConfig, description="encoders and patch features"
    )
    mil: MILConfig = Field(MILConfig(), description="attention-MIL and its cross-validation")
    finetune: FinetuneConfig = Field(FinetuneConfig(), description="attention top-k fine-tuning")
    cka: CKAConfig = Field(CKAConfig(), description="CKA of frozen vs fine-tuned encoders")
    export: ExportConfig = Field(ExportConfig(), description="the ONNX bundle")
    evaluation: EvaluationConfig = Field(EvaluationConfig(), description="metrics and heatmaps")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _local_output(cls, value: Any) -> Any:
        if str(value).startswith("gs:"):
            raise ValueError(
                "a gs:// output root is given on the command line (`histotransfer run --output-dir "
                "gs://BUCKET/FOLDER`): the study runs in a local staging folder and is uploaded"
            )
        return value

    @model_validator(mode="after")
    def _has_cohort(self) -> StudyConfig:
        if self.manifest is None and not self.sample_data.enabled:
            raise ValueError("set `manifest` to your cohort's CSV, or enable `sample_data`")
        return self

    @model_validator(mode="after")
    def _finetune_extracted(self) -> StudyConfig:
        extracted = {e.id for e in self.extraction.encoders}
        if missing := [e for e in self.finetune.encoders if e not in extracted]:
            raise ValueError(
                f"finetune.encoders {', '.join(missing)} not among extraction.encoders: fine-tuning starts "
                "from the frozen features' MIL, so add them there too"
            )
        return self


class PredictSettings(_Section):
    """`histotransfer predict`'s own settings (its flags; the tiling comes from the bundle)."""

    mpp: Mpp | None = Field(None, description="um/px of a single slide that records no resolution")
    batch_size: int = Field(64, ge=1, le=4096, description="tiles per encoder call")
    readers: int | None = Field(
        None, ge=1, le=256, description="tile reader threads (unset: one per core, at most 8)"
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="ONNX Runtime intra-op threads (unset: all cores)"
    )


MAX_LISTED_ERRORS = 20


def _format_errors(
    title: str, exc: ValidationError, *, key_of: Callable[[tuple[str, ...]], str] | None = None
) -> str:
    """One line per bad key (the first MAX_LISTED_ERRORS), values and messages cut short."""
    errors = exc.errors()
    lines = []
    for err in errors[:MAX_LISTED_ERRORS]:
        loc = tuple(short_text(str(p), 60) for p in err["loc"])
        key = (key_of(loc) if key_of else ".".join(loc)) or "(top level)"
        got = f" (got {short_repr(err['input'])})" if "input" in err else ""
        lines.append(f"  {key}: {short_text(err['msg'])}{got}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    return f"{title}:\n" + "\n".join(lines)


def predict_settings(**flags: Any) -> PredictSettings:
    """`histotransfer predict`'s flags (None: not given) validated; a ConfigError names each flag."""
    try:
        return PredictSettings.model_validate({k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(
            _format_errors("invalid flags of histotransfer predict", exc, key_of=_flag)
        ) from None


def _flag(loc: tuple[str, ...]) -> str:
    return f"--{loc[0].replace('_', '-')}" if loc else ""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read a YAML config (None: the defaults), apply dotted-key overrides, validate."""
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        loaded = read_yaml_file(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    if overrides:
        with_flags = "with the command's flags and --set"
        source = f"{path} {with_flags}" if path is not None else f"(defaults {with_flags})"
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:  # absent, or `section:` with nothing under it
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(
                    f"cannot override {short_text(dotted, 100)}: {short_text(part, 60)} is not a section"
                )
        node[leaf] = value
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str) -> StudyConfig:
    """``data`` (sections as dicts) validated; a ConfigError lists each bad key of ``source``."""
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(f"invalid config {source}", exc)) from exc


def parse_assignments(pairs: list[str], *, option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs of a command-line ``option``; values are YAML (``5``, ``{epochs: 5}``)."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"{option} expects KEY=VALUE (e.g. tiling.target_mpp=1.0), got {short_repr(pair)}"
            )
        parsed[key.strip()] = load_yaml(
            value,
            source=f"the value of {option} {short_repr(pair)}",
            syntax_hint="; quote text and write lists as [a, b]",
        )
    return parsed


# The embedded demo's config: what `histotransfer run` runs without --config (params.yaml is its copy)
DEMO_CONFIG = Path(__file__).parent.parent / "demo.yaml"  # beside the package root: a data file, not code

# Settings that change how fast (or in how much memory) a stage runs, never what it makes: resume hashes
# leave them out (a changed batch size reuses every result) and so do DVC's params (pipelines/dvc_stages.py).
SPEED_ONLY: dict[str, set[str]] = {
    # device and backend stay: precision auto follows them (bf16 with torch on a GPU, fp32 with ORT)
    "extraction": {"batch_size", "num_workers"},
    "mil": {"bag_cache_gb"},
    "finetune": {"grad_checkpointing"},
}


def results_of(section: str, settings: BaseModel) -> dict[str, Any]:
    """A config section's settings that change results (JSON-ready): what resume hashes cover."""
    return settings.model_dump(mode="json", exclude=SPEED_ONLY.get(section, set()))
