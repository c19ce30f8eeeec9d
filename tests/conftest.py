"""Shared fixtures: real-tissue cohorts built by the project's own sample-data code, and small
synthetic slides with known geometry written by the project's own SVS writer."""

from __future__ import annotations

import os
import tempfile

# Tests never reach a model hub; without this, a hub lookup retries for about a minute first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Hypothesis keeps its files outside the repository (tests/contract/test_properties.py uses no example
# database).
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "histotransfer-hypothesis")
)

# Under pytest-xdist (`make test` runs one worker per core) each worker owns one core: thread pools
# sized to the whole machine in every worker would fight over the cores. HISTOTRANSFER_CPUS is the
# documented knob for sharing a node, so the stages and their subprocesses split one core too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HISTOTRANSFER_CPUS"):
        os.environ.setdefault(name, "1")

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from histotransfer.core.config import SampleDataConfig
from histotransfer.wsi.sample_data import build_sample_cohort
from histotransfer.wsi.svs import write_aperio_svs
from tests.helpers import (
    EASY_COHORT,
    GOLDEN_MPP,
    GOLDEN_SIZE,
    GOLDEN_TISSUE,
    LINEAGE_ENCODER,
    SMALL_STUDY,
    MadeStudy,
    synthetic_slide_rgb,
)


@pytest.fixture(scope="session")
def golden_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("golden") / "golden.svs"
    rgb = synthetic_slide_rgb(GOLDEN_SIZE, [GOLDEN_TISSUE])
    return write_aperio_svs(path, rgb, mpp=GOLDEN_MPP, downsamples=(2, 8))


@pytest.fixture(scope="session")
def sample_cohort(tmp_path_factory) -> Path:
    """Four small real-tissue slides at 0.5 um/px (two tumor, two normal); returns the manifest."""
    config = SampleDataConfig(n_slides=4, seed=7, **EASY_COHORT)
    return build_sample_cohort(tmp_path_factory.mktemp("cohort"), config=config)


@dataclass(frozen=True)
class SmallStudy:
    config: Path
    root: Path  # the study's output_dir
    run: subprocess.CompletedProcess  # `histotransfer run` as a user runs it


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills once per test session, shared by the pytest-xdist workers:
    the first worker to ask builds it under a file lock while the others wait, then all read it. A build
    that fails leaves no folder behind, and the next asker builds it again (and fails alike)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # every worker's basetemp is a folder of this one
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def small_study(tmp_path_factory) -> SmallStudy:
    """`histotransfer run` (a subprocess) on six real-tissue slides with one encoder: tiles, features,
    3-fold MIL, the ONNX bundle and the report, built once per session and shared by the workers (the
    CLI, export and predict checks read it, the KFP and DVC checks run on its cohort and compare their
    features with its own). Tests read it and may re-run it (which reuses all)."""

    def build(folder: Path) -> None:
        config = folder / "study.yaml"
        config.write_text(SMALL_STUDY.format(out=folder / "study"))
        proc = subprocess.run(
            [sys.executable, "-m", "histotransfer.cli", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (folder / "run.json").write_text(
            json.dumps({"args": proc.args, "stdout": proc.stdout, "stderr": proc.stderr})
        )

    folder = built_once(tmp_path_factory, "small-study", build)
    run = json.loads((folder / "run.json").read_text())
    proc = subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])
    return SmallStudy(folder / "study.yaml", folder / "study", proc)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle of a small random encoder and a random head, written by the exporter (no study)."""
    from histotransfer.core.config import MILConfig, TilingConfig
    from histotransfer.deploy.bundle import AggregatorInfo
    from histotransfer.deploy.packaging import write_bundle
    from histotransfer.features.encoders import build_encoder
    from histotransfer.features.onnx_encoder import OPSET
    from histotransfer.mil.training import build_model

    encoder = build_encoder("resnet18@layer1+random")
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    write_bundle(
        out,
        encoder=encoder,
        head=build_model(encoder.dim, 2, MILConfig()),
        classes=["normal", "tumor"],
        tiling=TilingConfig(patch_size_px=64),
        aggregator=AggregatorInfo(mil_dir="none", fold=0, val_loss=None, train_loss=0.5, kind="abmil"),
        probes=None,
        precision="fp32",
        opset=OPSET,
        source_hash="tiny",
    )
    return out


@pytest.fixture(scope="session")
def made_study(tmp_path_factory, sample_cohort) -> MadeStudy:
    from histotransfer.cli import main
    from histotransfer.features.encoders import build_encoder
    from histotransfer.io.manifest import read_manifest

    tmp = tmp_path_factory.mktemp("made-study")
    root = tmp / "study"
    weights, other = tmp / "a.pth", tmp / "b.pth"
    torch.save(build_encoder("resnet18@layer1+random", seed=1).module.model.state_dict(), weights)
    torch.save(build_encoder("resnet18@layer1+random", seed=2).module.model.state_dict(), other)
    study = MadeStudy(root, sample_cohort, weights, other)
    m, tiles, with_weights = str(sample_cohort), str(study.tiles), ["--weights", str(weights)]
    fast = ["--folds", "2", "--epochs", "1", "--set", "mil.restarts=1", "--set", "evaluation.bootstrap=100"]
    slide = read_manifest(sample_cohort)[0].path
    for argv in (
        ["tile", m, "--out", tiles],
        [
            "extract",
            m,
            "--tiles",
            tiles,
            "--encoder",
            LINEAGE_ENCODER,
            *with_weights,
            "--out",
            f"{root}/features",
        ],
        ["train", m, "--features", str(study.features), "--tiles", tiles, "--out", f"{root}/mil", *fast],
        ["export", "--mil", str(study.mil), *with_weights, "--out", str(study.bundle)],
        ["predict", slide, "--bundle", str(study.bundle), "--out", f"{root}/predictions", "--no-heatmaps"],
    ):
        assert main(argv) == 0, argv
    return study


# Fixtures that run a whole study: a test using one is slow and must be marked integration, so that
# `make test-fast` (-m "not integration") never builds a study.
STUDY_FIXTURES = {"small_study", "made_study"}


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may use (affinity mask, container limit), not per
    core of the host (pytest-xdist counts physical cores, psutil being installed)."""
    from histotransfer.core.cpus import available_cpus

    return available_cpus()


# How long a test file keeps its worker, roughly, by the heaviest marker among its tests.
WEIGHTS = {"docker": 3, "integration": 2, "slow": 1}


def _weight(item) -> int:
    return max((w for name, w in WEIGHTS.items() if item.get_closest_marker(name)), default=0)


@pytest.hookimpl(trylast=True)  # after -m has deselected: make test-fast orders what it runs
def pytest_collection_modifyitems(config, items):
    """Refuses a whole study outside the integration tier, and puts the heaviest files first: under
    ``--dist loadfile --no-loadscope-reorder`` the workers take files in this order, so the longest
    (the docker file: image builds, then containers) starts at once instead of last, when it alone
    would set the suite's wall time (longest first, a classic bound on the makespan)."""
    unmarked = [
        item.nodeid
        for item in items
        if STUDY_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that build a whole study must be marked integration: {unmarked}")
    weight: dict[Path, int] = {}
    count: dict[Path, int] = {}
    for item in items:
        weight[item.path] = max(weight.get(item.path, 0), _weight(item))
        count[item.path] = count.get(item.path, 0) + 1
    # then the files with more tests, as xdist's own reordering would; stable, so a file keeps its order
    items.sort(key=lambda item: (-weight[item.path], -count[item.path]))
