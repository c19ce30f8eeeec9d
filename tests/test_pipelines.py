"""Kubeflow Pipelines: the committed YAML is current and parses into the pipeline-spec protos; the IR
carries the image, GPU requests and Kubernetes settings; the study pipeline runs end to end with
kfp.local; submit talks to a (fake) KFP API server as kfp.Client would to a real one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from components.image import IMAGE
from histotransfer.config import load_config
from histotransfer.stages.orchestration import SECTIONS, study_config
from pipelines.cli import compile_pipeline
from pipelines.cli import main as pipeline_main
from pipelines.options import PARAMS, PipelineOptions
from tests.fake_kfp import running

REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = {"exec-extract-shard", "exec-finetune-step", "exec-cka-step"}


def load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.mark.parametrize("name", ["study", "inference"])
def test_committed_yaml_is_current_and_parses_into_protos(name, tmp_path):
    committed = REPO / "pipelines" / f"{name}.yaml"
    fresh = compile_pipeline(name, tmp_path / f"{name}.yaml")
    assert load(fresh) == load(committed), (
        f"pipelines/{name}.yaml is stale: run `histotransfer pipeline compile` and commit it"
    )
    spec, platform = load(committed)
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # raises on any unknown field
    if platform:
        json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())


def test_study_ir_image_resources_and_kubernetes():
    spec, platform = load(REPO / "pipelines" / "study.yaml")
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    for name, executor in executors.items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, f"{name} installs packages at run time"
        resources = executor["container"].get("resources", {})
        assert resources.get("cpuRequest") == 4
        if name in GPU_STEPS:
            accelerator = resources["accelerator"]
            assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1")
        else:
            assert "accelerator" not in resources, name
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == GPU_STEPS
    for settings in k8s.values():
        assert settings["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
        assert settings["tolerations"] == [
            {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
        ]
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["make-cohort"]["cachingOptions"] == {}  # the user's manifest is read by name: no cache
    assert tasks["merge-shards"]["cachingOptions"] == {"enableCache": True}
    for loop in ("for-loop-1", "for-loop-2", "for-loop-3"):  # tiling, extraction, MIL fan out
        assert "parameterIterator" in tasks[loop]


def test_parameters_mirror_the_config_file():
    spec, _ = load(REPO / "pipelines" / "study.yaml")
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {*SECTIONS, "manifest", "shards"}
    for name in SECTIONS:
        assert parameters[name]["parameterType"] == "STRUCT"
    # the defaults are params.yaml, section by section (numbers come back as floats: same values)
    compiled = study_config(**{name: parameters[name]["defaultValue"] for name in SECTIONS})
    expected = load_config(PARAMS)
    for name in SECTIONS:
        assert getattr(compiled, name) == getattr(expected, name), name


def test_gcs_secret_and_cpu_only_options(tmp_path):
    options = PipelineOptions(gpu=False, gcs_secret="gcs-reader")
    spec, platform = load(compile_pipeline("study", tmp_path / "s.yaml", options))
    executors = spec["deploymentSpec"]["executors"]
    assert all("accelerator" not in e["container"].get("resources", {}) for e in executors.values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for name, settings in k8s.items():
        assert settings["secretAsVolume"][0]["secretName"] == "gcs-reader", name
        assert settings["secretAsVolume"][0]["mountPath"] == "/var/secrets/google"
        assert "nodeSelector" not in settings
    env = executors["exec-tile-shard"]["container"]["env"]
    assert {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"} in env


def test_library_never_imports_kfp_and_the_pipeline_command_is_a_plugin(tmp_path):
    """Every library module imports, and every library command runs, with kfp and the pipelines
    package impossible to import; `histotransfer pipeline` comes from its entry point, from any folder."""
    script = """
import importlib, pkgutil, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kfp", "pipelines", "components"):
            raise ImportError(f"the library imported {name}")
sys.meta_path.insert(0, Refuse())
import histotransfer
for info in pkgutil.walk_packages(histotransfer.__path__, "histotransfer."):
    importlib.import_module(info.name)
from histotransfer.cli import main
assert main(["encoders"]) == 0
assert main(["pipeline", "compile", "--help"]) == 2  # the plugin cannot load here: a clear exit 2
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs the pipelines package and kfp" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run-local" in proc.stdout


def test_submit_creates_the_experiment_and_the_run(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("mil: {epochs: 7}\nextraction: {encoders: [{id: resnet18@layer3+random}]}\n")
    with running() as (fake, url):
        argv = [
            "submit",
            "--host",
            url,
            "--experiment",
            "lung",
            "--run-name",
            "trial-1",
            "--config",
            str(config),
        ]
        assert pipeline_main([*argv, "--param", "shards=8", "--param", "mil={lr: 0.0005}"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"] == "run-1"
        # a second submit to the same experiment reuses it
        assert pipeline_main(["submit", "--host", url, "--experiment", "lung", "--run-name", "trial-2"]) == 0
    posts = [r for r in fake.requests if r["method"] == "POST"]
    experiments = [r for r in posts if r["path"].endswith("/experiments")]
    assert [e["body"]["display_name"] for e in experiments] == ["lung"]
    runs = [r["body"] for r in posts if r["path"].endswith("/runs")]
    assert [r["display_name"] for r in runs] == ["trial-1", "trial-2"]
    assert all(r["experiment_id"] == "exp-1" for r in runs)
    first = runs[0]
    assert first["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "histotransfer-study"
    params = first["runtime_config"]["parameters"]
    assert params["shards"] == 8
    assert params["mil"]["epochs"] == 7  # from the config file
    assert params["mil"]["lr"] == 0.0005  # --param merged into the section
    assert params["extraction"]["encoders"] == [{"id": "resnet18@layer3+random"}]
    assert params["manifest"] == ""


def test_submit_rejects_bad_parameters_before_contacting_the_server(tmp_path):
    with running() as (fake, url), pytest.raises(Exception, match=r"mil\.epochs"):
        pipeline_main(["submit", "--host", url, "--config", str(PARAMS), "--param", "mil={epochs: -1}"])
    assert fake.requests == []


TINY = """
sample_data: {n_slides: 6, tissue_pieces: 1, site_mpp: [0.5], lesion_fraction: 0.25, artefacts: 0.0}
extraction:
  encoders: [{id: efficientnet_lite0@blocks.1}]
mil: {epochs: 2, folds: 3}
finetune: {encoders: [efficientnet_lite0@blocks.1], k: 4, epochs: 1, lr: 1.0e-4, patience: 1}
cka: {tiles: 32, batch_size: 16}
evaluation: {bootstrap: 100, heatmaps: 2}
"""


@pytest.mark.integration
def test_run_local_runs_the_whole_study_pipeline(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    root = tmp_path / "kfp"
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "pipeline", "run-local", "--config", str(config),
         "--pipeline-root", str(root), "--param", "shards=2"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"pipeline study finished; artifacts under {root}" in proc.stdout
    run = next(root.iterdir())
    tiles = run / "merge-shards" / "merged" / "tiles"
    assert len(list(tiles.glob("*.h5"))) == 6  # two shards merged
    summary = (tiles / "summary.csv").read_text().splitlines()
    assert len(summary) == 7
    assert len(list(run.glob("for-loop-1-iteration-*"))) == 2
    features = run / "merge-shards-2" / "merged" / "features" / "efficientnet_lite0@blocks.1"
    assert len(list(features.glob("*.h5"))) == 6
    bundle = run / "export-step" / "bundle" / "onnx" / "best" / "bundle.json"
    assert json.loads(bundle.read_text())["encoder"]["id"].startswith("efficientnet_lite0@blocks.1")
    assert list((run / "cka-step" / "comparison" / "cka").glob("*.json"))
    page = (run / "report-step" / "report").read_text()
    assert "<td>efficientnet_lite0@blocks.1+ft</td>" in page
    assert 'src="data:image/png;base64,' in page  # one self-contained page for the KFP UI
    assert "Deployable model (ONNX)" in (run / "report-step" / "summary").read_text()
    metrics = json.loads(
        (next(run.glob("for-loop-3-iteration-0")) / "train-mil" / "executor_output.json").read_text()
    )
    assert "auc" in metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert "confusionMatrix" in metrics["artifacts"]["classification"]["artifacts"][0]["metadata"]


@pytest.mark.integration
def test_inference_pipeline_runs_locally_on_a_bundle(small_study, tmp_path, capsys):
    bundle = small_study.root / "onnx" / "best"
    manifest = small_study.root / "cohort" / "manifest.csv"
    args = ["run-local", "--pipeline", "inference", "--pipeline-root", str(tmp_path / "kfp")]
    assert pipeline_main([*args, "--param", f"bundle_uri={bundle}", "--param", f"slides={manifest}"]) == 0
    assert "pipeline inference finished" in capsys.readouterr().out
    step = next((tmp_path / "kfp").iterdir()) / "predict-step"
    rows = (step / "predictions" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 7
    assert all(",done," in r for r in rows[1:])
    assert (step / "summary").read_text().startswith("# Predictions")


def test_docker_options_need_the_docker_runner(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pipeline_main(["run-local", "--image", "x:1", "--pipeline-root", str(tmp_path / "kfp")])
    assert exit_.value.code == 2
    assert "--image, --docker-user and --mount go with --runner docker" in capsys.readouterr().err
    assert not (tmp_path / "kfp").exists()


def test_an_image_option_sets_every_steps_image(tmp_path):
    path = compile_pipeline("study", tmp_path / "s.yaml", PipelineOptions(image="local/histotransfer:dev"))
    executors = next(yaml.safe_load_all(path.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"local/histotransfer:dev"}
