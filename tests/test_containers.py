"""The Dockerfile (no Docker engine here: linted with hadolint, read with dockerfile-parse), the image
tag the components use, the package version and the Makefile agree; the entrypoint dispatches."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

import histotransfer
from components.image import IMAGE, REGISTRY, VERSION

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "containers" / "Dockerfile"
ENTRYPOINT = REPO / "containers" / "entrypoint.sh"


def stages() -> dict[str, list[dict]]:
    """Instructions of each named stage."""
    out: dict[str, list[dict]] = {}
    current = None
    for item in DockerfileParser(str(DOCKERFILE)).structure:
        if item["instruction"] == "FROM":
            current = item["value"].split(" AS ")[-1].strip()
            out[current] = []
        if current is not None:
            out[current].append(item)
    return out


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cpu_and_gpu_targets_run_histotransfer_as_non_root():
    all_stages = stages()
    assert {"cpu", "gpu", "runtime"} <= set(all_stages)
    runtime = {i["instruction"]: i["value"] for i in all_stages["runtime"]}
    assert runtime["USER"] == "10001:10001"
    assert runtime["ENTRYPOINT"] == '["/usr/local/bin/entrypoint.sh"]'
    for target in ("cpu", "gpu"):
        instructions = [(i["instruction"], i["value"]) for i in all_stages[target]]
        assert instructions[0] == ("FROM", f"runtime AS {target}")  # inherits user and entrypoint
        assert not any(name in ("USER", "RUN") for name, _ in instructions)  # nothing runs as root after

    def runs(stage: str) -> str:
        return " ".join(i["value"] for i in all_stages[stage] if i["instruction"] == "RUN")

    assert "onnxruntime-gpu==" in runs("build-gpu")
    assert "onnxruntime-gpu" not in runs("build-cpu")


def test_base_image_and_versions_are_pinned_and_agree():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # an exact release, never :latest
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = dict(
        re.match(r"([\w-]+)==(\S+)", d).groups() for d in pyproject["project"]["dependencies"] if "==" in d
    )
    for package in ("torch", "torchvision"):
        assert f"{package}=={pins[package]}" in text
    assert VERSION == histotransfer.__version__ == pyproject["project"]["version"]
    assert f"{REGISTRY}/histotransfer:{VERSION}-gpu" == IMAGE
    kfp_pins = [
        d for d in pyproject["project"]["optional-dependencies"]["pipelines"] if d.startswith("kfp==")
    ]
    import kfp

    assert kfp_pins == [f"kfp=={kfp.__version__}"]  # the image's executor is the compiler's version


def test_makefile_builds_and_pushes_the_tag_the_components_use():
    out = subprocess.run(
        ["make", "-n", "image-gpu", "push"], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert f"containers/build.sh gpu {IMAGE}" in out.stdout
    assert f"docker push {IMAGE}" in out.stdout
    assert f"containers/build.sh cpu {IMAGE.removesuffix('-gpu')}" in out.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["histotransfer", "tile", "m.csv"], "histotransfer-called tile m.csv"),
        (["tile", "m.csv", "--out", "t"], "histotransfer-called tile m.csv --out t"),
        ([], "histotransfer-called"),
        (["echo", "plain"], "plain"),
        (["export", "--study", "s"], "histotransfer-called export --study s"),  # a builtin, not a program
    ],
)
def test_entrypoint_runs_histotransfer_or_the_given_program(args, expected, tmp_path):
    fake = tmp_path / "histotransfer"
    fake.write_text('#!/bin/sh\necho histotransfer-called "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == expected
