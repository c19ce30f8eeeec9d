import pytest

from histotransfer.core.config import DEMO_CONFIG, ConfigError, StudyConfig, load_config


def test_defaults_are_the_demo():
    config = load_config()
    assert config == StudyConfig()
    assert config.manifest is None
    assert config.sample_data.enabled
    assert (config.tiling.target_mpp, config.tiling.patch_size_px) == (0.5, 224)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tiling:\n  target_mpp: 1.0\n  tissue:\n    min_saturation: 30\n")
    config = load_config(path, {"tiling.patch_size_px": 256, "output_dir": "x"})
    assert config.tiling.target_mpp == 1.0
    assert config.tiling.tissue.min_saturation == 30
    assert config.tiling.patch_size_px == 256
    assert str(config.output_dir) == "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tiling:\n  target_mppp: 1.0\n", r"tiling.target_mppp: Extra inputs are not permitted"),
        ("tiling:\n  overlap: 1.5\n", r"tiling.overlap: Input should be less than 1"),
        ("tiling:\n  tissue:\n    min_saturation: 300\n", r"tiling.tissue.min_saturation"),
        ("sample_data:\n  enabled: false\n", r"set `manifest` to your cohort's CSV"),
        ("- a\n- b\n", r"must be a mapping of sections"),
        ("tiling: [\n", r"cannot read config"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"cannot override tiling\.target_mpp\.x"):
        load_config(None, {"tiling.target_mpp": 1.0, "tiling.target_mpp.x": 2})


def test_the_demo_config_is_valid_and_differs_from_the_schema_only_in_its_demo_choices():
    params = load_config(DEMO_CONFIG)
    defaults = StudyConfig()
    assert params.model_dump(exclude={"finetune", "mil"}) == defaults.model_dump(exclude={"finetune", "mil"})
    assert params.mil == defaults.mil.model_copy(update={"seeds": 3})  # the demo shows the seed spread
    assert params.finetune.encoders == ["efficientnet_lite0"]  # the demo fine-tunes one encoder ...
    assert (params.finetune.k, params.finetune.epochs) == (8, 3)  # ... at demo size
    assert (defaults.finetune.k, defaults.finetune.epochs, defaults.finetune.lr) == (64, 20, 1e-5)  # paper


# ---- YAML: one loader for config files, --set and --param values ------------------------------------


def _alias_bomb(levels: int, width: int = 10) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "mil:\n  epochs: 2\ntiling: {}\nmil:\n  lr: 0.1\n",
            "has the key 'mil' twice in one mapping (lines 1 and 4)",
        ),
        (
            "mil:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n",
            "has the key 'epochs' twice in one mapping (lines 2 and 4)",
        ),
        ("mil: {epochs: 2, epochs: 3}\n", "key 'epochs' twice in one mapping (line 1, columns 7 and 18)"),
        ("tiling:\n  tissue: {a: 1, b: 2}\n  tissue: {}\n", "the key 'tissue' twice"),
        ("1: a\n01: b\n", "has the key 1 twice"),  # YAML 1.1 reads both as the integer 1
        ("? [a, b]\n: 1\n", "it is not valid YAML at line 1"),  # an unhashable key
        (_alias_bomb(9), "expands to more than 100,000 values through YAML aliases"),
        (_alias_bomb(3, width=100), "expands to more than 100,000 values through YAML aliases"),
        (
            "a: &a [1, *a]\n",
            "has an alias inside the list or mapping it refers to (anchored at line 1, column 4)",
        ),
        ("a: &a {b: {c: *a}}\n", "YAML aliases must not loop"),
        ("x: " + "[" * 40 + "]" * 40 + "\n", "nests lists and mappings more than 32 levels deep"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nests lists and mappings more than 32 levels deep"),
        ("tiling:\n  target_mpp: 1.0\n  patch_size_px: [\n", "it is not valid YAML at line 4, column 1"),
        ("tiling:\n\ttarget_mpp: 1\n", "it is not valid YAML at line 2"),  # a tab indents
        ("mil: {epochs: !!int twenty}\n", "has a value at line 1, column 15 that is not a valid int"),
        ("mil: {epochs: " + "9" * 5000 + "}\n", "that is not a valid int (Exceeds the limit"),
        ("mil: !!python/object:os.system {}\n", "could not determine a constructor"),
        ("a: 1\n---\nb: 2\n", "but found another document"),
        ("tiling: {target_mpp: 1}\n\x07\n", "it is not valid YAML at line 2 (character 0x0007"),
    ],
)
def test_a_config_file_that_cannot_be_read_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"cannot read config {path}: it ")
    assert message in str(info.value)
    assert len(str(info.value)) < 600


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    import time

    path = tmp_path / "c.yaml"
    path.write_text(_alias_bomb(30))  # 10**30 values if expanded
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="through YAML aliases"):
        load_config(path)
    assert time.perf_counter() - start < 5


def test_aliases_within_the_limit_and_merge_keys_are_yaml_as_usual(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "base: &fast {epochs: 1, folds: 2}\n"
        "mil: {<<: *fast, epochs: 3}\n"  # a merge key: the keys beside it win, no duplicate
        "finetune: {epochs: 1}\n"
    )
    with pytest.raises(ConfigError, match=r"base: Extra inputs are not permitted"):
        load_config(path)  # read fine; `base` is just not a section
    from histotransfer.core.config import load_yaml

    assert load_yaml(path.read_text(), source="x")["mil"] == {"epochs": 3, "folds": 2}
    assert load_yaml("", source="x") is None


def test_a_huge_config_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"it is 2,097,155 bytes, and a config is a few KB"):
        load_config(path)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("mil={epochs: 2, epochs: 3}", "cannot read the value of --set 'mil={epochs: 2, epochs: 3}': it has"),
        ("tiling.target_mpp=[1,", "it is not valid YAML at line 1, column 4 (expected the node content"),
        ("mil=" + _alias_bomb(9).replace("\n", ", ").join("{}"), "through YAML aliases"),
        ("mil.epochs=!!float nope", "that is not a valid float"),
    ],
)
def test_set_values_are_read_by_the_same_loader(pair, message):
    from histotransfer.core.config import parse_assignments

    with pytest.raises(ConfigError) as info:
        parse_assignments([pair])
    assert message in str(info.value)


def test_a_syntax_error_in_a_set_value_says_how_to_write_values():
    from histotransfer.core.config import parse_assignments

    with pytest.raises(ConfigError, match=r"; quote text and write lists as \[a, b\]$"):
        parse_assignments(["tiling.target_mpp=[1,"])


# ---- error messages never print a value whole -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("mil.epochs", list(range(1_000_000)), "(got [0, 1, 2, 3, 4, 5, ...])"),
        ("mil.epochs", "x" * 10**6, "xxx...xxx"),
        ("mil.epochs", 10**5000, "(got <an integer of about 5,000 digits>)"),
        ("sample_data.site_mpp", [5.0] * 10**5, "got [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, ...]"),
        ("sample_data.lesion_types", ["solid"] * 10**5, "must be unique, got ['solid', 'solid'"),
        ("tiling." + "k" * 10**5, 1, "tiling.kkk"),
        ("mil", {f"k{i}": i for i in range(1000)}, "... and 980 more"),
    ],
    ids=["long list", "long text", "huge int", "list of floats", "list of texts", "long key", "many keys"],
)
def test_invalid_values_are_echoed_short(key, value, shown):
    with pytest.raises(ConfigError) as info:
        load_config(None, {key: value})
    assert shown in str(info.value)
    assert len(str(info.value)) < 3000


# ---- every number of the schema is bounded ----------------------------------------------------------


def _numeric_keys(model=None, prefix: str = "") -> list[tuple[str, bool]]:
    """Every numeric leaf of the schema as (dotted key, is it a pair/list of numbers), found by walking
    the models: a field added later is covered without editing this test."""
    import types
    import typing

    from pydantic import BaseModel

    model = model or StudyConfig
    found = []
    for name, field in model.model_fields.items():
        inner = field.annotation
        if typing.get_origin(inner) in (typing.Union, types.UnionType):  # X | None
            inner = next(a for a in typing.get_args(inner) if a is not type(None))
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found += _numeric_keys(inner, f"{prefix}{name}.")
            continue
        origin = typing.get_origin(inner)
        items = typing.get_args(inner) if origin in (tuple, list) else ()
        numbers = {int, float}
        base = lambda t: typing.get_args(t)[0] if typing.get_origin(t) is typing.Annotated else t  # noqa: E731
        if base(inner) in numbers and base(inner) is not bool:
            found.append((f"{prefix}{name}", False))
        elif items and all(base(t) in numbers for t in items):
            found.append((f"{prefix}{name}", True))
    return found


NUMERIC_KEYS = _numeric_keys()


def test_the_walk_finds_the_numbers():
    keys = dict(NUMERIC_KEYS)
    assert len(keys) > 50
    for key in ("tiling.tissue.mask_mpp", "mil.hidden_dims", "sample_data.lesion_fraction", "cka.seed"):
        assert key in keys


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 10**30, -(10**30)])
@pytest.mark.parametrize(("key", "pair"), NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_no_number_of_the_config_takes_nonfinite_or_huge_values(key, pair, bad):
    value = [bad, bad] if pair else bad
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("mil.hidden_dims", [0, 64], False),
        ("mil.hidden_dims", [256, 0], False),
        ("mil.hidden_dims", [1, 1], True),
        ("mil.hidden_dims", [8192, 8192], True),
        ("mil.hidden_dims", [8193, 64], False),
        ("mil.attention_dim", 0, False),
        ("tiling.target_mpp", 0.005, False),
        ("tiling.target_mpp", 0.01, True),
        ("tiling.target_mpp", 100, True),
        ("tiling.target_mpp", 100.5, False),
        ("tiling.tissue.mask_mpp", 352.8, False),
        ("tiling.tissue.mask_mpp", 0, False),
        ("extraction.batch_size", 0, False),
        ("extraction.batch_size", 4096, True),
        ("extraction.batch_size", 4097, False),
        ("extraction.num_workers", 0, True),
        ("cka.batch_size", 3, False),
        ("mil.epochs", 1.5, False),
        ("mil.epochs", 2.0, True),  # a whole float is an int
        ("mil.epochs", True, True),  # pydantic's lax bool-as-int; bounded anyway
        ("mil.lr", 0, False),
        ("mil.seed", 2**31, False),
        ("finetune.seed", -1, False),
        ("tiling.tissue.pen_hue_deg", [245, 60], False),
        ("tiling.tissue.pen_hue_deg", [0, 360], True),
        ("tiling.tissue.pen_hue_deg", [-1, 60], False),
        ("export.name", "x" * 101, False),
        ("sample_data.site_mpp", [0.5] * 33, False),
    ],
)
def test_bounds_table(key, value, ok):
    if ok:
        load_config(None, {key: value})
    else:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, {key: value})


def test_mpp_bounds_are_the_tilers():
    from histotransfer.wsi.slides import PLAUSIBLE_MPP

    low, high = PLAUSIBLE_MPP
    assert load_config(None, {"tiling.target_mpp": low}).tiling.target_mpp == low
    assert load_config(None, {"tiling.tissue.mask_mpp": high}).tiling.tissue.mask_mpp == high
    with pytest.raises(ConfigError, match=f"um/px must be within {low:g} to {high:g}"):
        load_config(None, {"tiling.target_mpp": high * 1.01})


# ---- predict's flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"batch_size": -5}, "--batch-size: Input should be greater than or equal to 1 (got -5)"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": 10**9}, "--batch-size: Input should be less than or equal to 4096"),
        ({"readers": 0}, "--readers"),
        ({"threads": -1}, "--threads"),
        ({"mpp": float("nan")}, "--mpp: Input should be a finite number"),
        ({"mpp": 0.0}, "--mpp: Value error, um/px must be within 0.01 to 100"),
        ({"mpp": 1e6}, "--mpp"),
    ],
)
def test_predict_settings_name_the_flag(flags, message):
    from histotransfer.core.config import predict_settings

    with pytest.raises(ConfigError) as info:
        predict_settings(**flags)
    assert str(info.value).startswith("invalid flags of histotransfer predict:")
    assert message in str(info.value)


def test_predict_settings_defaults_are_the_ones_predict_uses():
    from histotransfer.core.config import predict_settings
    from histotransfer.deploy.inference import BATCH_SIZE

    settings = predict_settings(mpp=None, batch_size=None, readers=None, threads=None)
    assert (settings.mpp, settings.batch_size, settings.readers, settings.threads) == (
        None,
        BATCH_SIZE,
        None,
        None,
    )
    assert predict_settings(mpp=0.25, batch_size=8, readers=2, threads=4).batch_size == 8
