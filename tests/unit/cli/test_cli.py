"""The command line's usage errors: exit 2 with the way out, before any work (every command's bad input,
row by row: tests/contract/test_bad_inputs.py; the commands on whole studies:
tests/integration/test_cli_study.py)."""

from histotransfer.cli import EXIT_BAD_INPUT, main
from tests.helpers import write_csv


def test_unavailable_weights_exit_2_with_the_way_out(sample_cohort, tmp_path, capsys):
    (tmp_path / "tiles").mkdir()
    code = main(
        [
            "extract",
            str(sample_cohort),
            "--tiles",
            str(tmp_path / "tiles"),
            "--encoder",
            "resnet18",
            "--out",
            str(tmp_path / "features"),
        ]
    )
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cannot load pretrained weights for resnet18" in err
    assert "resnet18+random" in err


def test_bad_manifest_exits_2_before_any_work(tmp_path, capsys):
    manifest = write_csv(tmp_path / "m.csv", [{"slide_id": "a/b", "path": "x.svs", "label": ""}])
    assert main(["tile", str(manifest), "--out", str(tmp_path / "t")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "line 2: slide_id 'a/b' is unsafe" in err
    assert "line 2: label is empty" in err
    assert not (tmp_path / "t").exists()


def test_bad_config_value_exits_2_naming_the_key(tmp_path, capsys):
    manifest = write_csv(tmp_path / "m.csv", [{"slide_id": "a", "path": "x.svs", "label": "t"}])
    code = main(["tile", str(manifest), "--out", str(tmp_path / "t"), "--overlap", "2"])
    assert code == EXIT_BAD_INPUT
    assert "tiling.overlap" in capsys.readouterr().err


def test_set_requires_key_value(capsys):
    assert main(["run", "--set", "tiling.target_mpp"]) == EXIT_BAD_INPUT
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
