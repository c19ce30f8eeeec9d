"""The command line's config flags are made from the schema (histotransfer.cli.flags.FLAGS): every entry
names a key of the schema, its argparse form matches the field as the schema's JSON Schema states it,
a value given by flag reaches its key, and a value out of the field's bounds exits 2 naming the key."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from histotransfer.cli import EXIT_BAD_INPUT, main
from histotransfer.cli.flags import FLAGS, Flag, flag_values, output, path, schema_of, study_config
from histotransfer.cli.parser import build_parser
from histotransfer.core.config import predict_settings

ENTRIES = [(command, flag) for command, flags in FLAGS.items() for flag in flags]
IDS = [f"{command} {flag.flag}" for command, flag in ENTRIES]
JSON = {"integer": int, "number": float, "string": str}


def json_field(command: str, key: str) -> dict[str, Any]:
    """The key's property in the JSON Schema of the command's schema, ``| None`` unwrapped."""
    schema = schema_of(command).model_json_schema()
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
        if "$ref" in node:
            node = {**schema["$defs"][node["$ref"].rsplit("/", 1)[-1]], **node}
    not_null = [a for a in node.get("anyOf", ()) if a.get("type") != "null"]
    return {**node, **not_null[0]} if not_null else node


def subparser(command: str) -> argparse.ArgumentParser:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def action_of(command: str, flag: Flag) -> argparse.Action:
    (action,) = (a for a in subparser(command)._actions if flag.flag in a.option_strings)
    return action


def default_of(command: str, key: str) -> Any:
    value = schema_of(command)()
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("command", "flag"), ENTRIES, ids=IDS)
def test_a_flag_has_the_form_of_its_field(command, flag):
    field = json_field(command, flag.key)  # KeyError: the table names a key the schema lacks
    action = action_of(command, flag)
    assert action.dest == flag.dest
    assert field.get("description"), f"{flag.key}: give its field a description (the flag's help)"
    assert action.help.startswith(field["description"].replace("%", "%%"))
    if field["type"] == "boolean":
        assert isinstance(action, argparse.BooleanOptionalAction)
        assert action.default is None  # not given: the config's value
        return
    item = field
    if field["type"] == "array":
        assert action.nargs == "+"
        item = field.get("items") or field["prefixItems"][0]
    else:
        assert action.nargs is None
    assert list(action.choices or []) == item.get("enum", [])
    if item.get("format") == "path":
        assert action.type in (path, output)
    else:
        assert action.type is JSON[item["type"]]
    for bound, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if bound in item:
            number = item[bound]
            assert f"{sign} {number if isinstance(number, int) else format(number, 'g')}" in action.help


def sample(command: str, flag: Flag) -> Any:
    """A valid value of the flag's field other than its default."""
    field, default = json_field(command, flag.key), default_of(command, flag.key)
    item = field.get("items") or (field.get("prefixItems") or [field])[0]
    if field["type"] == "boolean":
        return not default
    if "enum" in item:
        value = next(v for v in item["enum"] if v not in (default if field["type"] == "array" else [default]))
        return [value] if field["type"] == "array" else value
    if item["type"] == "string":
        return Path("elsewhere") if item.get("format") == "path" else "cpu"
    if field["type"] == "array":
        return [v * 2 for v in default]
    low = item.get("minimum", item.get("exclusiveMinimum"))
    high = item.get("maximum", item.get("exclusiveMaximum"))
    if low is None or high is None:
        return 1.0 if default is None else default * 2
    if item["type"] == "integer":
        return low + 1 if low + 1 != default else low + 2
    return next(v for v in (low + (high - low) / 4, low + (high - low) / 2) if v != default)


def words(flag: Flag, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag.flag if value else f"--no-{flag.flag[2:]}"]
    return [flag.flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]


def required(command: str) -> list[str]:
    """Placeholders for the command's positional and required arguments (parsed, never read)."""
    argv = []
    for action in subparser(command)._actions:
        if not action.option_strings and action.nargs != argparse.REMAINDER:
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], "x"]
    return argv


@pytest.mark.parametrize(("command", "flag"), ENTRIES, ids=IDS)
def test_a_value_given_by_flag_reaches_its_key(command, flag):
    value = sample(command, flag)
    args = build_parser().parse_args([command, *required(command), *words(flag, value)])
    assert flag_values(args) == {flag.key: value}
    made = predict_settings(**flag_values(args)) if command == "predict" else study_config(args)
    for part in flag.key.split("."):
        made = getattr(made, part)
    assert (list(made) if isinstance(made, tuple) else made) == value


BOUNDED = [(c, f) for c, f in ENTRIES if {"maximum", "exclusiveMaximum"} & set(json_field(c, f.key))]


@pytest.mark.parametrize(("command", "flag"), BOUNDED, ids=[f"{c} {f.flag}" for c, f in BOUNDED])
def test_a_value_out_of_bounds_given_by_flag_exits_2_naming_it(command, flag, tmp_path, capsys):
    field = json_field(command, flag.key)
    too_big = field.get("maximum", field.get("exclusiveMaximum")) + (1 if "maximum" in field else 0)
    argv = [str(tmp_path / "x") if word == "x" else word for word in required(command)]
    assert main([command, *argv, flag.flag, str(too_big)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    named = flag.flag if command == "predict" else flag.key  # predict's settings are its flags
    assert f"{named}: Input should be less than" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not list(tmp_path.iterdir())  # refused before any work


def test_no_module_of_the_command_line_is_over_300_lines():
    package = Path(sys.modules["histotransfer.cli"].__file__).parent
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in package.glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


@pytest.mark.parametrize("module", ["histotransfer", "histotransfer.cli"])
def test_python_m_runs_the_command_line(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("histotransfer ")


def test_a_bare_run_is_the_demo_and_a_study_of_your_own_starts_from_the_schema(tmp_path):
    """`histotransfer run` alone runs the embedded demo (as make demo does); --set alone or --config
    start from the schema's defaults (no demo-sized fine-tuning slipped into a real study)."""
    from histotransfer.core.config import DEMO_CONFIG, StudyConfig, load_config

    def config_of(*argv: str) -> StudyConfig:
        return study_config(build_parser().parse_args(["run", *argv]))

    demo = load_config(DEMO_CONFIG)
    assert config_of().model_dump(exclude={"output_dir"}) == demo.model_dump(exclude={"output_dir"})
    assert config_of("--output-dir", str(tmp_path)).finetune.encoders == demo.finetune.encoders
    own = config_of("--set", "mil.epochs=5")
    assert own.finetune.encoders == []
    assert own.mil.epochs == 5
    assert own.model_dump(exclude={"mil"}) == StudyConfig().model_dump(exclude={"mil"})
