"""The images built and run: every stage under `docker run` (no network, a mounted folder owned by the
invoking user) against the same chain from .venv, the study pipeline under kfp.local's Docker runner,
and the slim predict image on a bundle the full image made.

Needs a Docker engine (`containers/engine.sh up`; .ci/run starts one): skipped with the reason when none
answers, failed instead when HISTOTRANSFER_REQUIRE_DOCKER=1 (CI). The images are built with
containers/build.sh under the tags `make image` / `make image-predict` give them, reusing the layer cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from components.image import REGISTRY, VERSION
from tests.helpers import REPO, SMALL_STUDY_ENCODER, TINY, assert_same_features

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CPU = f"{REGISTRY}/histotransfer:{VERSION}"
PREDICT = f"{REGISTRY}/histotransfer:{VERSION}-predict"
ENCODER = "efficientnet_lite0@blocks.1"
# 4 slides, 2 folds: small enough for a container per stage, every stage still does its real work
CHAIN_CONFIG = """
mil: {epochs: 2, folds: 2, restarts: 1}
finetune: {k: 4, epochs: 1, patience: 1}
cka: {tiles: 32, batch_size: 16}
evaluation: {bootstrap: 100, heatmaps: 1}
"""
# The invoking user: a folder of theirs is mounted and every container runs as them. Under root, a
# stand-in user, so that a file written as root or as the image's user would show.
USER = "12345:12345" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def docker(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"docker {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def engine():
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
        reason = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no answer"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    if reason is not None:
        message = f"no Docker engine answers ({reason}); `containers/engine.sh up` starts one"
        if os.environ.get("HISTOTRANSFER_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def build(target: str, tag: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(REPO / "containers" / "build.sh"), target, tag], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"build of {target} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return time.perf_counter() - start, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def images(engine):
    """Both images, built (from the layer cache when it has them); their build times are printed."""
    times = {tag: build(target, tag)[0] for target, tag in (("cpu", CPU), ("predict", PREDICT))}
    print("image builds: " + ", ".join(f"{tag} {s:.0f} s" for tag, s in times.items()))
    return times


def run(image: str, *args: str, data: Path, network: bool = False) -> subprocess.CompletedProcess:
    """`docker run` as the invoking user with ``data`` mounted at /data, no network."""
    options = ["--rm", "--user", USER, "-v", f"{data}:/data"] + ([] if network else ["--network", "none"])
    return docker("run", *options, image, *args, check=False)


def venv(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def owned_by_user(folder: Path) -> list[str]:
    uid, gid = (int(x) for x in USER.split(":"))
    return [str(p) for p in folder.rglob("*") if (p.lstat().st_uid, p.lstat().st_gid) != (uid, gid)]


def test_the_cached_build_reruns_nothing_and_the_images_are_what_they_say(images):
    seconds, log = build("cpu", CPU)
    assert "Running in" not in log, log[-3000:]  # every step from the layer cache
    sizes = {
        tag: int(docker("image", "inspect", tag, "--format", "{{.Size}}").stdout) for tag in (CPU, PREDICT)
    }
    print(
        f"cached rebuild of the cpu image: {seconds:.0f} s; sizes: "
        + ", ".join(f"{t} {b / 1e9:.2f} GB" for t, b in sizes.items())
    )
    assert sizes[PREDICT] < 1e9  # the slim serving image
    assert docker("run", "--rm", CPU, "id", "-u").stdout.strip() == "10001"
    assert docker("run", "--rm", PREDICT, "id", "-u").stdout.strip() == "10001"
    no_torch = docker("run", "--rm", PREDICT, "python", "-c", "import torch", check=False)
    assert no_torch.returncode == 1
    assert "No module named 'torch'" in no_torch.stderr
    # a study command in the predict image: exit 2, naming the extra and the image to use
    proc = docker("run", "--rm", "--network", "none", PREDICT, "extract", "m.csv", "--tiles", "t",
                  "--encoder", "resnet18", "--out", "/tmp/f", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "the 'study' extra" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def chain(images, tmp_path_factory):
    """A 4-slide sample cohort made in .venv; the stage chain in containers on it (data/docker) and
    tile + extract in .venv (data/venv)."""
    data = tmp_path_factory.mktemp("docker-data")
    (data / "study.yaml").write_text(CHAIN_CONFIG)
    venv("sample-data", str(data / "cohort"), "--n-slides", "4", "--tissue-pieces", "1", "--mpp", "0.5",
         "--artefacts", "0", "--lesion-fraction", "0.25")  # fmt: skip
    if os.geteuid() == 0:
        uid, gid = (int(x) for x in USER.split(":"))
        for path in [data, *data.rglob("*")]:
            os.chown(path, uid, gid)
    manifest, cfg, study = "/data/cohort/manifest.csv", ["--config", "/data/study.yaml"], "/data/docker"
    steps = [
        ("tile", manifest, "--out", f"{study}/tiles"),
        ("extract", manifest, "--tiles", f"{study}/tiles", "--encoder", ENCODER,
         "--out", f"{study}/features"),
        ("train", manifest, *cfg, "--features", f"{study}/features/{ENCODER}", "--tiles", f"{study}/tiles",
         "--out", f"{study}/mil"),
        ("finetune", manifest, *cfg, "--study", study, "--encoder", ENCODER),
        ("cka", manifest, *cfg, "--study", study, "--encoder", ENCODER),
        ("export", *cfg, "--study", study, "--out", f"{study}/onnx/best"),
        ("report", study),
    ]  # fmt: skip
    seconds = {}
    for step in steps:
        start = time.perf_counter()
        proc = run(CPU, *step, data=data)
        seconds[step[0]] = time.perf_counter() - start
        assert proc.returncode == 0, f"{step[0]} in the container: {proc.stderr[-3000:]}"
    print("stage chain in containers: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    local = data / "venv"
    venv("tile", str(data / "cohort" / "manifest.csv"), "--out", str(local / "tiles"))
    venv("extract", str(data / "cohort" / "manifest.csv"), "--tiles", str(local / "tiles"),
         "--encoder", ENCODER, "--out", str(local / "features"))  # fmt: skip
    return data


def test_the_stage_chain_in_containers_matches_venv_and_leaves_the_users_files(chain):
    docker_study, local = chain / "docker", chain / "venv"
    slides = sorted(p.name for p in (local / "tiles").glob("*.h5"))
    assert len(slides) == 4
    for name in slides:
        with h5py.File(docker_study / "tiles" / name) as a, h5py.File(local / "tiles" / name) as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
    assert_same_features(docker_study / "features" / ENCODER, local / "features" / ENCODER, slides=4)
    assert (docker_study / "mil" / ENCODER / "metrics.json").is_file()
    assert (docker_study / "finetune" / ENCODER / "fold0" / "encoder.pt").is_file()
    assert list((docker_study / "cka").glob("*.json"))
    bundle = json.loads((docker_study / "onnx" / "best" / "bundle.json").read_text())
    assert bundle["encoder"]["id"].startswith(ENCODER)  # frozen or fine-tuned: the study's best
    assert "<html" in (docker_study / "report" / "index.html").read_text().lower()
    assert owned_by_user(docker_study) == []  # every file the containers wrote is the invoking user's
    assert not list(chain.rglob("*.partial"))


def test_the_slim_image_classifies_slides_with_the_full_images_bundle(chain):
    proc = run(PREDICT, "predict", "/data/cohort/manifest.csv", "--bundle", "/data/docker/onnx/best",
               "--out", "/data/predictions", data=chain)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predictions: 4 of 4 slide(s) ready" in proc.stdout
    rows = (chain / "predictions" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5
    assert all(",done," in r for r in rows[1:])
    # the same bundle in .venv gives the same probabilities
    bundle = chain / "docker" / "onnx" / "best"
    venv("predict", str(chain / "cohort" / "manifest.csv"), "--bundle", str(bundle),
         "--out", str(chain / "venv-predictions"), "--no-heatmaps")  # fmt: skip
    ours = {r.split(",")[0]: float(r.split(",")[-1]) for r in rows[1:]}
    local = (chain / "venv-predictions" / "predictions.csv").read_text().splitlines()[1:]
    for row in local:
        assert ours[row.split(",")[0]] == pytest.approx(float(row.split(",")[-1]), abs=1e-5)
    assert owned_by_user(chain / "predictions") == []


def test_the_study_pipeline_runs_under_the_docker_runner(images, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    root = tmp_path / "kfp"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "run-local", "--runner", "docker",
         "--image", CPU, "--config", str(config), "--pipeline-root", str(root), "--param", "shards=2"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    print(f"study pipeline under the Docker runner: {time.perf_counter() - start:.0f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = next(root.iterdir())
    page = (run_dir / "report-step" / "report").read_text()
    assert f"<td>{SMALL_STUDY_ENCODER}+ft</td>" in page  # TINY's encoder
    bundle = run_dir / "export-step" / "bundle" / "onnx" / "best" / "bundle.json"
    assert json.loads(bundle.read_text())["encoder"]["id"].startswith(SMALL_STUDY_ENCODER)
    # every step ran in the image as its user, as on a cluster
    owners = {p.stat().st_uid for p in run_dir.rglob("*") if p.is_file() and "executor_output" not in p.name}
    assert owners == {10001}, owners
    assert re.search(r"Found image .*histotransfer:" + re.escape(VERSION), proc.stdout)


def test_the_docker_runner_names_an_image_that_is_not_built(engine, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "run-local", "--runner", "docker",
         "--image", "histotransfer-missing:0", "--pipeline-root", str(tmp_path / "kfp")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "image histotransfer-missing:0 is not on this machine: build it" in proc.stderr
    assert not (tmp_path / "kfp").exists()


def test_the_inference_pipeline_runs_under_the_docker_runner(chain, tmp_path):
    # the bundle and the slides are the user's folder (mode 0700), mounted read-only into the step,
    # which runs as that user (--docker-user), as do the pipeline root's files
    bundle, root = chain / "docker" / "onnx" / "best", tmp_path / "kfp"
    root.mkdir()
    if os.geteuid() == 0:
        os.chown(root, *(int(x) for x in USER.split(":")))
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "run-local", "--runner", "docker",
         "--pipeline", "inference", "--image", CPU, "--mount", str(chain), "--docker-user", USER,
         "--pipeline-root", str(root),
         "--param", f"bundle_uri={bundle}", "--param", f"slides={chain / 'cohort' / 'manifest.csv'}"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = next(root.iterdir()) / "predict-step"
    rows = (step / "predictions" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5
    assert all(",done," in r for r in rows[1:])
    assert owned_by_user(step) == []


def test_a_failed_step_is_exit_1_with_the_steps_reason(chain, tmp_path):
    # the image's user cannot read the user's 0700 folder: the step fails and says so, no "internal error"
    bundle, manifest = chain / "docker" / "onnx" / "best", chain / "cohort" / "manifest.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "run-local", "--runner", "docker",
         "--pipeline", "inference", "--image", CPU, "--mount", str(chain),
         "--pipeline-root", str(tmp_path / "kfp"),
         "--param", f"bundle_uri={bundle}", "--param", f"slides={manifest}"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Permission denied" in proc.stdout
    assert "Inner task failed: 'predict-step'. Its output above has the reason" in proc.stderr
    assert "internal error" not in proc.stderr
