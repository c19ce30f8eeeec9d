"""The Dockerfile (linted with hadolint, read with dockerfile-parse; tests/integration/test_docker.py builds
and runs it), the image tag the components use, the package version and the Makefile agree; the install
extras; the entrypoint dispatches."""

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
from tests.helpers import REPO

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


def test_every_target_runs_histotransfer_as_non_root():
    all_stages = stages()
    assert {"cpu", "gpu", "predict", "runtime"} <= set(all_stages)
    runtime = {i["instruction"]: i["value"] for i in all_stages["runtime"]}
    assert runtime["ENTRYPOINT"] == '["/usr/local/bin/entrypoint.sh"]'
    for target in ("cpu", "gpu", "predict"):
        instructions = [(i["instruction"], i["value"]) for i in all_stages[target]]
        assert runtime_chain(all_stages, target)[-1] == "runtime"  # inherits the entrypoint
        user = [n for n, (name, _) in enumerate(instructions) if name == "USER"]
        assert user
        assert instructions[user[-1]][1] == "10001:10001"
        assert not any(name == "RUN" for name, _ in instructions[user[-1] :])  # nothing runs as root after
        runs = [value for name, value in instructions if name == "RUN"]
        assert runs == ["pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels"]  # the package only

    def runs(stage: str) -> str:
        return " ".join(i["value"] for i in all_stages[stage] if i["instruction"] == "RUN")

    def copies(stage: str) -> list[str]:
        return [i["value"] for i in all_stages[stage] if i["instruction"] == "COPY"]

    assert "onnxruntime-gpu<=$ort" in runs("deps-gpu")
    assert "check_gpu.py" in runs("deps-gpu")  # CUDA of torch and onnxruntime-gpu agree
    assert "onnxruntime-gpu" not in runs("deps-study")
    assert "requirements.py study pipelines > /src/study.txt" in runs("requirements")
    assert "requirements.py > /src/predict.txt" in runs("requirements")  # the core: no torch
    # each dependency stage is keyed on its list alone (not on pyproject.toml) and builds on runtime
    for stage, listed in (("deps-study", "study"), ("deps-gpu", "study"), ("deps-predict", "predict")):
        assert f"--from=requirements /src/{listed}.txt /tmp/requirements.txt" in copies(stage), stage
        assert not any("pyproject" in c for c in copies(stage)), stage
        assert runtime_chain(all_stages, stage)[-1] == "runtime", stage
    # a target is its dependency layer plus the package: the venv is never copied into a new layer
    for target in ("cpu", "gpu", "predict"):
        assert not any("/opt/venv" in c for c in copies(target)), target


def runtime_chain(all_stages: dict[str, list[dict]], stage: str) -> list[str]:
    """The stages ``stage`` is built on, nearest first, down to runtime (or the base image)."""
    chain = []
    while stage in all_stages and stage != "runtime":
        stage = all_stages[stage][0]["value"].split(" AS ")[0].strip()
        chain.append(stage)
    return chain


def test_the_core_install_has_no_torch_and_the_study_extra_has_it():
    from containers.requirements import requirements

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = requirements(project, [])
    names = {re.match(r"[\w.-]+", r).group(0).lower() for r in core}
    assert not names & {"torch", "torchvision", "timm", "scikit-learn", "onnx", "kfp"}
    assert {"onnxruntime", "openslide-python", "h5py"} <= names
    full = requirements(project, ["dev"])  # dev names histotransfer[study,pipelines]: expanded
    assert "torch==2.14.1" in full
    assert "kfp==2.17.3" in full
    assert "pytest>=8,<10" in full
    assert not any(r.startswith("histotransfer") for r in full)


def test_a_study_command_without_the_study_extra_says_which_extra(tmp_path):
    # torch made unimportable, as in the predict image: exit 2 naming the extra, no traceback
    code = (
        "import sys; sys.modules['torch'] = None; from histotransfer.cli import main; "
        "sys.exit(main(['extract', 'm.csv', '--tiles', 't', '--encoder', 'resnet18', '--out', "
        f"{str(tmp_path / 'f')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "the 'study' extra" in proc.stderr
    assert "pip install 'histotransfer[study]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_base_image_and_versions_are_pinned_and_agree():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # an exact release, never :latest
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = dict(
        re.match(r"([\w-]+)==(\S+)", d).groups()
        for d in pyproject["project"]["optional-dependencies"]["study"]
        if "==" in d
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


@pytest.mark.slow
def test_makefile_builds_and_pushes_the_tag_the_components_use():
    out = subprocess.run(
        ["make", "-n", "image-gpu", "push"], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert f"containers/build.sh gpu {IMAGE}" in out.stdout
    assert f"docker push {IMAGE}" in out.stdout
    assert f"containers/build.sh cpu {IMAGE.removesuffix('-gpu')}" in out.stdout
    assert f"containers/build.sh predict {IMAGE.removesuffix('-gpu')}-predict" in out.stdout


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


def test_the_gpu_check_fails_on_a_cpu_onnxruntime():
    # .venv has the CPU onnxruntime, as the cpu image does: the GPU image's build step must refuse it
    check = REPO / "containers" / "check_gpu.py"
    proc = subprocess.run([sys.executable, str(check)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "GPU image check failed" in proc.stderr
    assert "is not a CUDA build" in proc.stderr
    assert "no CUDAExecutionProvider" in proc.stderr


def _bin(folder: Path, **scripts: str) -> Path:
    """A PATH folder holding ``name: shell body`` scripts (and nothing else)."""
    folder.mkdir()
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize(
    ("scripts", "message"),
    [
        ({}, "debootstrap is not installed: apt-get install debootstrap"),
        ({"debootstrap": "touch ran"}, "docker is not installed: containers/engine.sh up installs"),
        ({"debootstrap": "touch ran", "docker": "exit 1", "id": "echo 0"}, "no Docker engine answers"),
        ({"debootstrap": "touch ran", "docker": "exit 0", "id": "echo 1000"}, "debootstrap needs root"),
    ],
    ids=["no debootstrap", "no docker", "no engine", "not root"],
)
def test_base_image_names_what_is_missing_before_making_anything(scripts, message, tmp_path):
    path = _bin(tmp_path / "bin", **scripts)
    proc = subprocess.run(
        ["/bin/bash", str(REPO / "containers" / "base-image.sh"), "t:1"],
        capture_output=True,
        text=True,
        env={"PATH": str(path), "HOME": str(tmp_path)},
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line
    assert proc.stderr.startswith("base-image: ")
    assert message in proc.stderr
    assert not (tmp_path / "ran").exists()  # debootstrap never ran


def test_build_without_an_engine_says_how_to_start_one(tmp_path):
    path = _bin(tmp_path / "bin", docker="exit 1", dirname='/usr/bin/dirname "$@"')
    proc = subprocess.run(
        ["/bin/bash", str(REPO / "containers" / "build.sh"), "cpu", "t:1"],
        capture_output=True,
        text=True,
        env={"PATH": str(path)},
        check=False,
    )
    assert proc.returncode == 1
    assert "build: no Docker engine answers (docker info fails): containers/engine.sh up" in proc.stderr


def _module_imports(path: Path) -> set[str]:
    """The package modules a source file imports at module level (what importing it needs)."""
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("histotransfer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("histotransfer")}
    return found


def test_the_assets_stage_copies_every_module_fetching_the_assets_imports_where_it_belongs():
    """Regression: moving modules into subpackages left the assets stage copying them flat into
    /src/histotransfer/, and the image build failed on an import. The module-level import closure of
    histotransfer.io.assets (and each package's __init__) must be copied to its own folder."""
    copied = set()
    for item in stages()["assets"]:
        if item["instruction"] == "COPY":
            *sources, dest = item["value"].split()
            copied |= {f"{dest.rstrip('/')}/{Path(s).name}" for s in sources}
    needed, todo = set(), ["histotransfer.io.assets"]
    while todo:
        module = todo.pop()
        path = REPO / "src" / (module.replace(".", "/") + ".py")
        if not path.is_file():  # a package: its __init__
            path = path.with_suffix("") / "__init__.py"
        rel = path.relative_to(REPO / "src").as_posix()
        if rel in needed:
            continue
        needed.add(rel)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages above it
        todo += sorted(_module_imports(path))
    assert needed <= {c.removeprefix("/src/") for c in copied}, sorted(
        needed - {c.removeprefix("/src/") for c in copied}
    )
