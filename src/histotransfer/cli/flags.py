"""Command-line flags made from the config schema: ``FLAGS`` says which config keys each command exposes,
and ``argument`` makes a key's argparse argument from its field (type, choices, nargs, help), so a flag
cannot drift from its key. Bounds stay with the schema: a value out of them is refused when the config
is validated, in one line naming the key (``predict``'s settings: naming the flag).
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from histotransfer.core.config import (
    DEMO_CONFIG,
    PredictSettings,
    StudyConfig,
    load_config,
    parse_assignments,
)
from histotransfer.io.storage import is_gcs_uri


def path(value: str) -> Path:
    """A path flag's value; an empty one is a usage error (Path("") would be the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or folder")
    return Path(value)


def output(value: str) -> Path | str:
    """An output root: a local Path, or a gs:// URI kept as text (Path would fold its '//')."""
    return value if is_gcs_uri(value) else path(value)


@dataclass(frozen=True)
class Flag:
    """A config key as a command's flag: ``--LEAF`` (underscores as dashes) unless ``name`` says."""

    key: str  # dotted, in the command's schema (SCHEMAS)
    name: str | None = None
    type: Callable[[str], Any] | None = None  # instead of the field's own (a path that may be gs://)

    @property
    def flag(self) -> str:
        return self.name or "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


# The one table of which config keys each command sets by flag (every other key: --config, --set).
FLAGS: dict[str, tuple[Flag, ...]] = {
    "sample-data": (
        Flag("sample_data.n_slides"),
        Flag("sample_data.positive_fraction"),
        Flag("sample_data.lesion_types"),
        Flag("sample_data.lesion_fraction"),
        Flag("sample_data.tissue_pieces"),
        Flag("sample_data.sites"),
        Flag("sample_data.site_mpp", "--mpp"),
        Flag("sample_data.variation"),
        Flag("sample_data.artefacts"),
        Flag("sample_data.seed"),
    ),
    "tile": (
        Flag("tiling.target_mpp"),
        Flag("tiling.patch_size_px", "--patch-size"),
        Flag("tiling.overlap"),
        Flag("tiling.min_tissue_fraction"),
    ),
    "extract": (
        Flag("extraction.device"),
        Flag("extraction.batch_size"),
        Flag("extraction.num_workers"),
        Flag("extraction.precision"),
        Flag("extraction.backend"),
    ),
    "train": (
        Flag("mil.epochs"),
        Flag("mil.lr"),
        Flag("mil.folds"),
        Flag("mil.aggregator"),
        Flag("mil.selection"),
        Flag("mil.seed"),
        Flag("mil.seeds"),
    ),
    "finetune": (
        Flag("finetune.k"),
        Flag("finetune.epochs"),
        Flag("finetune.lr"),
        Flag("finetune.head_lr"),
        Flag("finetune.selection"),
        Flag("finetune.freeze_blocks"),
        Flag("finetune.accumulate"),
        Flag("finetune.augment"),
        Flag("extraction.device"),
    ),
    "cka": (
        Flag("cka.tiles", "--n-tiles"),
        Flag("cka.batch_size"),
        Flag("cka.seed"),
        Flag("cka.fold"),
        Flag("extraction.device"),
    ),
    "export": (Flag("export.fp16"), Flag("export.fold")),
    "predict": (Flag("mpp"), Flag("batch_size"), Flag("readers"), Flag("threads")),  # PredictSettings
    "cohort": (Flag("manifest", type=output),),  # a gs:// manifest is fetched
    "run": (Flag("output_dir", type=output),),  # a gs:// root: staged locally, then uploaded
}
SCHEMAS: dict[str, type[BaseModel]] = {"predict": PredictSettings}  # the others: StudyConfig


def schema_of(command: str) -> type[BaseModel]:
    return SCHEMAS.get(command, StudyConfig)


def field_of(key: str, schema: type[BaseModel] = StudyConfig) -> FieldInfo:
    """The schema's field of a dotted key (KeyError: no such key)."""
    *sections, leaf = key.split(".")
    model = schema
    for section in sections:
        model = model.model_fields[section].annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise KeyError(f"{key}: {section} is not a section")
    return model.model_fields[leaf]


@dataclass(frozen=True)
class Form:
    """What argparse needs of a field's type: its scalar type, choices, and nargs for a list or tuple."""

    type: Callable[[str], Any]
    choices: tuple[Any, ...] | None = None
    nargs: str | None = None

    @classmethod
    def of(cls, annotation: Any) -> Form:
        hint, nargs = _bare(annotation), None
        if typing.get_origin(hint) in (list, tuple):
            (hint,) = {_bare(a) for a in typing.get_args(hint) if a is not Ellipsis}
            nargs = "+"  # the schema checks the length
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
            return cls(type(choices[0]), choices, nargs)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return cls(str, tuple(member.value for member in hint), nargs)
        if hint in (bool, int, float, str):
            return cls(hint, None, nargs)
        if hint is Path:
            return cls(path, None, nargs)
        raise TypeError(f"no command-line form for {annotation!r}")


def _bare(hint: Any) -> Any:
    """``hint`` without Annotated metadata and without ``| None``."""
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            hint = typing.get_args(hint)[0]
        elif origin in (typing.Union, types.UnionType):
            (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
        else:
            return hint


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # of annotated_types' Ge, Gt, Le, Lt, Interval


def help_of(field: FieldInfo) -> str:
    """The field's description, its bounds and its default (argparse formats help with %)."""
    extra = []
    for bound in field.metadata:
        for attr, sign in BOUNDS.items():
            if (value := getattr(bound, attr, None)) is not None:
                extra.append(f"{sign} {_text(value)}")
    default = field.get_default(call_default_factory=True)
    if default is not None:
        extra.append(f"default {_text(default)}")
    more = f" ({', '.join(extra)})" if extra else ""
    return f"{field.description or ''}{more}".replace("%", "%%")


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_text(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def argument(flag: Flag, schema: type[BaseModel] = StudyConfig) -> dict[str, Any]:
    """``add_argument``'s keywords for ``flag``, from its field in ``schema``."""
    field = field_of(flag.key, schema)
    form = Form.of(field.annotation)
    made: dict[str, Any] = {"dest": flag.dest, "help": help_of(field)}
    if form.type is bool:  # --augment / --no-augment; neither: the config's value
        return made | {"action": argparse.BooleanOptionalAction, "default": None}
    made["type"] = flag.type or form.type
    if form.choices is not None:
        made["choices"] = form.choices
    if form.nargs is not None:
        made["nargs"] = form.nargs
    return made


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The command's config flags (FLAGS) on its parser."""
    for flag in FLAGS[command]:
        parser.add_argument(flag.flag, **argument(flag, schema_of(command)))


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys set by the command's flags (a flag not given sets nothing)."""
    flags = FLAGS.get(args.command, ())
    return {f.key: value for f in flags if (value := getattr(args, f.dest, None)) is not None}


# commands that run the embedded demo when bare: no --config and no --set (a study of your own, even one
# given by --set alone, starts from the schema's defaults: never from the demo's toy fine-tuning)
DEMO_COMMANDS = ("run", "cohort")


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The command's config: --config (bare run and cohort: the embedded demo's), then --set, then its
    flags."""
    assignments = getattr(args, "set", None) or []
    path = args.config
    if path is None and not assignments and args.command in DEMO_COMMANDS:
        path = DEMO_CONFIG
    return load_config(path, parse_assignments(assignments) | flag_values(args))
