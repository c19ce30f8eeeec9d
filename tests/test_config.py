import pytest

from histotransfer.config import ConfigError, StudyConfig, load_config


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


def test_params_yaml_is_valid_and_is_the_demo():
    from pathlib import Path

    params = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    defaults = StudyConfig()
    assert params.model_dump(exclude={"finetune", "mil"}) == defaults.model_dump(exclude={"finetune", "mil"})
    assert params.mil == defaults.mil.model_copy(update={"seeds": 3})  # the demo shows the seed spread
    assert params.finetune.encoders == ["efficientnet_lite0"]  # the demo fine-tunes one encoder ...
    assert (params.finetune.k, params.finetune.epochs) == (8, 3)  # ... at demo size
    assert (defaults.finetune.k, defaults.finetune.epochs, defaults.finetune.lr) == (64, 20, 1e-5)  # paper
