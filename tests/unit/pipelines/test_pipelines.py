"""Kubeflow Pipelines: the committed YAML is current and parses into the pipeline-spec protos; the IR
carries the image, GPU requests and Kubernetes settings; submit talks to a (fake) KFP API server as
kfp.Client would to a real one; usage errors are exit 2. The pipelines under kfp.local:
tests/integration/test_kfp_local.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from components.image import IMAGE
from histotransfer.core.config import load_config
from histotransfer.stages.adapter import SECTIONS, study_config
from pipelines.launch import compile_pipeline
from pipelines.launch import main as pipeline_main
from pipelines.options import PARAMS, PipelineOptions
from tests.fake_kfp import running
from tests.helpers import REPO

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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_docker_options_need_the_docker_runner(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pipeline_main(["run-local", "--image", "x:1", "--pipeline-root", str(tmp_path / "kfp")])
    assert exit_.value.code == 2
    assert "--image, --docker-user and --mount go with --runner docker" in capsys.readouterr().err
    assert not (tmp_path / "kfp").exists()


@pytest.mark.slow
def test_an_image_option_sets_every_steps_image(tmp_path):
    path = compile_pipeline("study", tmp_path / "s.yaml", PipelineOptions(image="local/histotransfer:dev"))
    executors = next(yaml.safe_load_all(path.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"local/histotransfer:dev"}


# ---- usage errors of `histotransfer pipeline`: exit 2 and one `error:` line, before any request -----


def _pipeline(argv: list[str], capsys) -> tuple[int, str]:
    from histotransfer.cli import main

    code = main(["pipeline", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == (code == 2)
    return code, err


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["mli={epochs: 2}"], "--param 'mli': the study pipeline has no such parameter (did you mean mil?)"),
        (["shard=2"], "(did you mean shards?)"),
        (["Tiling={}"], "(did you mean tiling?)"),
        (["mil.epochs=2"], "a section is one parameter: --param 'mil={epochs: ...}'"),
        (["zzz=1"], "has no such parameter; its parameters: manifest, shards, sample_data, tiling"),
        (["shards=four"], "--param shards: the study pipeline's shards is of type Integer, got 'four'"),
        (["shards=true"], "is of type Integer, got True"),
        (["manifest=7"], "is of type String, got 7"),
        (["mil=5"], "is of type Dict, got 5"),
        (["mil={epochs: 2, epochs: 3}"], "it has the key 'epochs' twice in one mapping"),
        (["mil={epochs: .nan}"], "mil.epochs"),
        (["mil={lr: .inf}"], "mil.lr: Input should be a finite number"),
        (["tiling={target_mpp: 1000}"], "tiling.target_mpp: Value error, um/px must be within 0.01 to 100"),
    ],
)
def test_a_wrong_param_is_exit_2_naming_the_valid_ones(params, message, capsys):
    with running() as (fake, url):
        argv = ["submit", "--host", url]
        for param in params:
            argv += ["--param", param]
        code, err = _pipeline(argv, capsys)
    assert code == 2
    assert message in err
    assert fake.requests == []


def test_the_inference_pipeline_has_its_own_parameters(capsys):
    with running() as (fake, url):
        base = ["submit", "--host", url, "--pipeline", "inference"]
        code, err = _pipeline([*base, "--param", "bundle=gs://b/onnx/best"], capsys)
        assert code == 2
        assert "(did you mean bundle_uri?); its parameters: bundle_uri, slides" in err
        code, err = _pipeline([*base, "--param", "bundle_uri=gs://b/onnx/best"], capsys)
        assert code == 2
        assert "the inference pipeline needs --param slides=... (no default)" in err
    assert fake.requests == []


@pytest.mark.parametrize("selector", ["gpu", "=true", "nvidia.com/gpu"])
def test_a_node_selector_without_key_and_value_is_exit_2(selector, tmp_path, capsys):
    code, err = _pipeline(["compile", "--out-dir", str(tmp_path), "--gpu-node-selector", selector], capsys)
    assert code == 2
    assert "--gpu-node-selector" in err
    assert "expects KEY=VALUE, a node label of the GPU nodes (e.g. nvidia.com/gpu.present=true)" in err
    assert not list(tmp_path.iterdir())


def test_node_selectors_that_are_fine():
    from pipelines.launch import node_selector

    assert node_selector("") is None
    assert node_selector("pool=gpu") == ("pool", "gpu")
    assert node_selector("cloud.google.com/gke-accelerator=nvidia-l4") == (
        "cloud.google.com/gke-accelerator",
        "nvidia-l4",
    )
    assert node_selector("gpu=") == ("gpu", "")


class _Silent:
    """A TCP server that takes connections and never answers (a hung endpoint)."""

    def __enter__(self) -> str:
        import socket

        self.server = socket.create_server(("127.0.0.1", 0))  # the kernel accepts into its backlog
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.close()


class _NotKFP:
    """An HTTP server answering 404 to everything (a URL that is not the KFP API)."""

    def __enter__(self) -> str:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_error(404)

            def do_POST(self):
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _refused() -> str:
    from tests.helpers import free_port

    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        (_refused, "(connection refused: nothing listens on that port)"),
        (lambda: "http://no-such-host.invalid:8080", "(its host name does not resolve)"),
        (lambda: "not a url", "(it is not a URL like http://HOST:PORT)"),
        (_Silent, "(no answer within 1 s)"),
        (_NotKFP, "answered HTTP 404 Not Found for /apis/v2beta1/healthz: not a Kubeflow Pipelines API"),
    ],
    ids=["refused", "dns", "not a url", "timeout", "not kfp"],
)
def test_an_unreachable_host_is_exit_2_naming_it(endpoint, reason, monkeypatch, capsys):
    import contextlib
    import time

    import pipelines.launch

    monkeypatch.setattr(pipelines.launch, "HOST_TIMEOUT_S", 1)
    made = endpoint()
    with (
        made if isinstance(made, contextlib.AbstractContextManager) else contextlib.nullcontext(made) as host
    ):
        start = time.perf_counter()
        code, err = _pipeline(["submit", "--host", host], capsys)
    assert code == 2
    assert f"error: --host {host!r}: " in err
    assert reason in err
    assert "check the URL" in err
    assert time.perf_counter() - start < 30


def test_the_module_entry_runs_through_histotransfers_exit_statuses(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.launch",
            "compile",
            "--out-dir",
            str(tmp_path),
            "--gpu-node-selector",
            "x",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --gpu-node-selector 'x': expects KEY=VALUE")
