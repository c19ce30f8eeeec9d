"""The study as a DVC pipeline, in a fresh git repository holding this repository's dvc.yaml: dvc repro
runs it (a small config, on the small study's cohort, whose features it makes again), a second repro does
nothing, metrics/params/plots/experiments work, and the
guide's GCS recipes (docs/dvc-and-gcs.md) round-trip slides and the study's data byte for byte through a
GCS emulator."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import BUCKET, EASY_COHORT, REPO, SMALL_STUDY_ENCODER, assert_same_features, free_port

BIN = Path(sys.executable).parent
DVC_OUTPUTS = ("cohort", "tiles", "features", "mil", "finetune", "cka", "onnx", "report")


def small_params(manifest: Path | None = None) -> dict:
    """The committed params.yaml, shrunk: two truncated encoders, one fine-tuned, tiny folds; on
    ``manifest`` (a user's cohort) when given, else on a small sample cohort."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample_data"].update(n_slides=6, **EASY_COHORT)
    if manifest is not None:
        params["manifest"] = str(manifest)
    params["extraction"]["encoders"] = [
        {"id": "efficientnet_lite0@blocks.1"},
        {"id": SMALL_STUDY_ENCODER},
    ]
    params["mil"].update(epochs=2, folds=2, restarts=1)
    params["finetune"].update(encoders=[{"id": "efficientnet_lite0@blocks.1"}], k=4, epochs=1, patience=1)
    params["cka"].update(tiles=32, batch_size=16)
    params["evaluation"].update(bootstrap=100, heatmaps=2)
    return params


def sh(args: list[str], cwd: Path, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_study):
    """A fresh clone-like repository: dvc.yaml, .dvc/, src/ (stage deps) and a small params.yaml whose
    manifest is the small study's cohort (a user's own manifest)."""
    root = tmp_path_factory.mktemp("dvc-project")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(
        REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local")
    )
    shutil.copytree(REPO / "src" / "histotransfer", root / "src" / "histotransfer")
    manifest = small_study.root / "cohort" / "manifest.csv"
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(manifest), sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    sh(["git", "init", "-q"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project"], root)
    first = sh(["dvc", "repro"], root, env)
    return root, env, first


@pytest.mark.integration
def test_repro_runs_the_study_and_a_second_repro_does_nothing(project, small_study):
    root, env, first = project
    assert "Running stage 'extract@1'" in first.stdout
    assert "Running stage 'finetune@0'" in first.stdout
    study = root / "study"
    assert not (study / "cohort" / "slides").exists()  # the user's cohort: no sample cohort was built
    assert len(list((study / "tiles").glob("*.h5"))) == 6
    # the same encoder on the same cohort: DVC's features are the CLI's
    features = study / "features" / SMALL_STUDY_ENCODER
    assert_same_features(features, small_study.root / "features" / SMALL_STUDY_ENCODER, slides=6)
    for encoder in (
        "efficientnet_lite0@blocks.1",
        SMALL_STUDY_ENCODER,
        "efficientnet_lite0@blocks.1+ft",
    ):
        assert (study / "mil" / encoder / "metrics.json").is_file()
    assert (study / "onnx" / "best" / "bundle.json").is_file()
    assert 'href="../onnx/best/bundle.json"' in (study / "report" / "index.html").read_text()
    assert list((study / "cka").rglob("*.json"))
    again = sh(["dvc", "repro"], root, env)
    assert "Data and pipelines are up to date." in again.stdout
    assert "Running stage" not in again.stdout


@pytest.mark.integration
def test_metrics_plots_params_and_experiments(project):
    root, env, _ = project
    metrics = sh(["dvc", "metrics", "show", "--json"], root, env).stdout
    assert '"efficientnet_lite0@blocks.1+ft"' in metrics
    assert '"auc"' in metrics
    plots = sh(["dvc", "plots", "show", "--json"], root, env).stdout
    assert f"study/plots/roc/{SMALL_STUDY_ENCODER}.csv" in plots
    assert "study/plots/truncation.csv" in plots
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "study"], root)
    run = sh(["dvc", "exp", "run", "-S", "export.fp16=true"], root, env)
    assert "Running stage 'export'" in run.stdout
    assert "Running stage 'train" not in run.stdout  # only what depends on the changed key
    bundle = yaml.safe_load((root / "study" / "onnx" / "best" / "bundle.json").read_text())
    assert bundle["encoder"]["precision"] == "fp16"
    diff = sh(["dvc", "params", "diff"], root, env).stdout
    assert re.search(r"export\.fp16\s+False\s+True", diff)


@pytest.mark.integration
def test_a_speed_setting_leaves_the_pipeline_up_to_date(project):
    root, env, _ = project
    params = root / "params.yaml"
    before = params.read_text()
    config = yaml.safe_load(before)
    config["extraction"].update(batch_size=7, num_workers=1)
    config["mil"]["bag_cache_gb"] = 1.0
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        status = sh(["dvc", "status"], root, env).stdout
    finally:
        params.write_text(before)
    assert "Data and pipelines are up to date." in status, status


@pytest.mark.integration
def test_the_cohort_stage_takes_a_users_manifest(project, small_study, tmp_path):
    """params.yaml's manifest (slide paths relative to it, here) becomes the cohort: a copy of its rows
    with absolute paths, no sample cohort built; tiling runs on its slides."""
    root, env, _ = project
    own = tmp_path / "own"
    shutil.copytree(small_study.root / "cohort" / "slides", own / "slides")
    rows = (root / "study" / "cohort" / "manifest.csv").read_text().splitlines()
    header, body = rows[0].split(","), [r.split(",") for r in rows[1:4]]
    path_col = header.index("path")
    for row in body:
        row[path_col] = "slides/" + Path(row[path_col]).name
    (own / "cohort.csv").write_text("\n".join(",".join(r) for r in [header, *body]) + "\n")
    user = tmp_path / "user-project"
    user.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, user / name)
    shutil.copytree(
        REPO / ".dvc", user / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local")
    )
    shutil.copytree(REPO / "src" / "histotransfer", user / "src" / "histotransfer")
    params = small_params() | {"manifest": str(own / "cohort.csv")}
    (user / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], user)
    sh(["dvc", "repro", "tile"], user, env)
    cohort = user / "study" / "cohort"
    assert not (cohort / "slides").exists()  # a copy of the user's rows, not the sample cohort
    copied = (cohort / "manifest.csv").read_text()
    assert str(own / "slides") in copied
    assert len(list((user / "study" / "tiles").glob("*.h5"))) == 3


def guide_recipe() -> list[str]:
    """The guide's GCS recipe (docs/dvc-and-gcs.md): the bash block that adds a gs:// remote."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "dvc-and-gcs.md").read_text(), re.S)
    block = next(b for b in blocks if "dvc remote add -d gcs" in b)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


@pytest.mark.integration
def test_guide_gcs_recipe_round_trips_slides_and_study_byte_for_byte(project, sample_cohort):
    from gcp_storage_emulator.server import create_server
    from google.cloud import storage

    root, env, _ = project
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        env = env | {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "histotransfer-test",
        }
        slides = sorted((sample_cohort.parent / "slides").glob("*.svs"))
        shutil.copytree(sample_cohort.parent / "slides", root / "slides")
        os.environ.update({k: env[k] for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")})
        bucket = storage.Client().bucket(BUCKET)
        for path in slides[:2]:
            bucket.blob(f"cohort/slides/{path.name}").upload_from_filename(str(path))
        for line in guide_recipe():  # add, import-url, remote add, push, pull: as a user types them
            sh(line.replace("my-bucket", BUCKET).split(), root, env)
        before = {name: digests(root / name) for name in ("slides", "gcs-slides", "study")}
        assert len(before["gcs-slides"]) == 2
        assert sorted(before["gcs-slides"]) == sorted(p.name for p in slides[:2])
        # a new machine (a clone: git's files, no cache, no data): pull everything from the GCS remote
        shutil.rmtree(root / ".dvc" / "cache")
        for name in ("slides", "gcs-slides"):
            shutil.rmtree(root / name)
        for section in DVC_OUTPUTS:
            for child in (root / "study" / section).iterdir():
                if child.name != ".gitignore":  # tracked by git, so a clone has it
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        pulled = sh(["dvc", "pull"], root, env)
        assert "fetched" in pulled.stdout
        after = {name: digests(root / name) for name in ("slides", "gcs-slides", "study")}
        assert after == before
        assert "up to date" in sh(["dvc", "status"], root, env).stdout
    finally:
        for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
            os.environ.pop(key, None)
        server.stop()
