"""`histotransfer pipeline compile | run-local | submit`: a command this package adds to the CLI.

compile     write pipelines/study.yaml and pipelines/inference.yaml (the committed, versioned YAML)
run-local   a pipeline on this machine with kfp.local: in this environment (SubprocessRunner) or every
            step in the image under Docker (DockerRunner), as a cluster runs it
submit      compile and start a run on a Kubeflow Pipelines endpoint with kfp.Client
"""

from __future__ import annotations

import argparse
import difflib
import functools
import http.client
import json
import re
import socket
import ssl
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from histotransfer.core.config import parse_assignments, short_repr, short_text
from histotransfer.core.errors import ConfigError
from pipelines.options import PARAMS, REPO, PipelineOptions, default_parameters

PIPELINES = ("study", "inference")
HOST_TIMEOUT_S = 60  # an endpoint that takes the connection but never answers
PORT_FORWARD = (
    "kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80, then --host http://localhost:8080"
)
# The Python types of KFP's parameter types (a YAML value of --param must be one of them)
KFP_TYPES: dict[str, tuple[type, ...]] = {
    "String": (str,),
    "Integer": (int,),
    "Float": (int, float),
    "Boolean": (bool,),
    "Dict": (dict,),
    "List": (list,),
}


def build(name: str, options: PipelineOptions):
    from pipelines import inference_pipeline, study_pipeline

    return {"study": study_pipeline.build, "inference": inference_pipeline.build}[name](options)


def compile_pipeline(name: str, path: Path, options: PipelineOptions | None = None) -> Path:
    """Compile pipeline ``name`` to ``path``, atomically, never over a file that is not a pipeline of
    ours (histotransfer.io.atomic refuses it)."""
    import shutil

    from kfp import compiler

    from histotransfer.io.atomic import atomic_path

    with tempfile.TemporaryDirectory(prefix="histotransfer-compile-") as tmp:
        compiled = Path(tmp) / f"{name}.yaml"  # kfp picks the format from the name
        compiler.Compiler().compile(build(name, options or PipelineOptions()), str(compiled))
        with atomic_path(path) as out:
            shutil.copyfile(compiled, out)
    return path


def node_selector(text: str) -> tuple[str, str] | None:
    """``--gpu-node-selector KEY=VALUE`` as (key, value); '' for none."""
    if not text:
        return None
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--gpu-node-selector {short_repr(text)}: expects KEY=VALUE, a node label of the GPU nodes "
            "(e.g. nvidia.com/gpu.present=true), or '' for none"
        )
    return key.strip(), value.strip()


def options_from(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        gpu=not args.no_gpu,
        gpu_node_selector=node_selector(args.gpu_node_selector),
        gpu_toleration=args.gpu_toleration or None,
        gcs_secret=args.gcs_secret,
    )


@functools.cache
def parameters(pipeline: str) -> dict[str, Any]:
    """The pipeline's parameters (kfp InputSpecs: type, default, optional), from its definition."""
    return dict(build(pipeline, PipelineOptions()).component_spec.inputs)


def _closest(name: str, names: list[str]) -> str:
    section, dot, key = name.partition(".")
    if dot and section in names:  # mil.epochs=5
        return f" (a section is one parameter: --param '{section}={{{key}: ...}}')"
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_parameters(pipeline: str, given: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Each --param names a parameter of the pipeline (``inputs``: its component spec's) and has its
    type; else a ConfigError naming the valid names and the closest one."""
    for name, value in given.items():
        if name not in inputs:
            hint = _closest(name, list(inputs))
            raise ConfigError(
                f"--param {short_repr(name)}: the {pipeline} pipeline has no such parameter{hint}; its "
                f"parameters: {', '.join(inputs)}"
            )
        kind = inputs[name].type
        types = KFP_TYPES.get(kind, (object,))
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(
                f"--param {name}: the {pipeline} pipeline's {name} is of type {kind}, got "
                f"{short_repr(value)} (the value is YAML: quote text, write a section as {{key: value}})"
            )


def arguments(config: Path | None, params: list[str], pipeline: str) -> dict[str, Any]:
    """Run arguments: the config file's sections (study), then --param overrides; validated."""
    from histotransfer.stages.adapter import SECTIONS, study_config

    inputs = parameters(pipeline)
    given = parse_assignments(params, option="--param")  # mil={epochs: 5}, shards=8
    check_parameters(pipeline, given, inputs)
    args: dict[str, Any] = default_parameters(config) if (config and pipeline == "study") else {}
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            value = {**args[key], **value}  # a section given in part keeps the file's other keys
        args[key] = value
    if missing := [name for name, spec in inputs.items() if not spec.optional and name not in args]:
        raise ConfigError(
            f"the {pipeline} pipeline needs {' '.join(f'--param {m}=...' for m in missing)} (no default)"
        )
    if pipeline == "study":
        study_config(**{k: v for k, v in args.items() if k in SECTIONS})  # fails early, naming the key
    return {k: v for k, v in args.items() if v is not None}  # not set: the parameter's own default


def _unreachable(exc: BaseException) -> str:
    """Why a request to the KFP endpoint failed, in a few words (urllib3 wraps the socket's error)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 8:
        chain.append(exc)
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else exc.__cause__ or exc.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if "NameResolutionError" in names or any(isinstance(e, socket.gaierror) for e in chain):
        return "its host name does not resolve"
    if any(isinstance(e, ssl.SSLError) for e in chain) or "SSLError" in names:
        return "no HTTPS there: a URL without http:// means https://, give http://HOST:PORT for plain HTTP"
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in text:
        return "connection refused: nothing listens on that port"
    if names & {"LocationParseError", "LocationValueError", "InvalidURL"} or any(
        isinstance(e, ValueError) for e in chain
    ):
        return "it is not a URL like http://HOST:PORT"
    if "timed out" in text or names & {"ReadTimeoutError", "ConnectTimeoutError"}:
        return f"no answer within {HOST_TIMEOUT_S} s"
    return short_text(f"{type(chain[0]).__name__}: {chain[0]}", 200)


def _cannot_reach(host: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"--host {short_repr(host, limit=200)}: cannot reach a Kubeflow Pipelines API there "
        f"({_unreachable(exc)}); check the URL and port, or the port-forward ({PORT_FORWARD})"
    )


def probe_endpoint(host: str) -> None:
    """Raise a ConfigError unless ``host`` answers the KFP health check within HOST_TIMEOUT_S: kfp.Client
    waits for ever on an endpoint that takes the connection and never answers, and retries a 404 for
    20 s, printing tracebacks. 401 and 403 pass: kfp.Client brings the credentials."""
    url = (host if "://" in host else f"https://{host}").rstrip("/") + "/apis/v2beta1/healthz"  # as kfp
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # kfp.Client uses no proxy
    try:
        opener.open(url, timeout=HOST_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # a multi-user install
            return
        raise ConfigError(
            f"--host {short_repr(host, limit=200)}: answered HTTP {exc.code} {exc.reason} for "
            f"{urllib.parse.urlsplit(url).path}: not a Kubeflow Pipelines API; check the URL (the KFP "
            f"UI's address serves the API; a port-forward: {PORT_FORWARD})"
        ) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise _cannot_reach(host, exc) from None


@contextmanager
def kfp_endpoint(host: str) -> Iterator[None]:
    """Failing requests to the KFP API at ``host`` become a ConfigError naming it and what to check."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _cannot_reach(host, exc) from None
    except kfp_server_api.ApiException as exc:
        raise ConfigError(
            f"--host {short_repr(host, limit=200)}: the Kubeflow Pipelines API answered HTTP {exc.status} "
            f"{exc.reason} ({short_text(str(exc.body or ''), 200)}); check that the URL is the KFP API "
            "(the UI's address serves it), and --namespace and --token for a multi-user install"
        ) from None


def docker_runner(image: str, pipeline_root: Path, user: str | None, mounts: Sequence[Path]):
    """kfp.local's DockerRunner for ``image``: each step runs in it as the image's user (uid 10001, as
    on a cluster) or ``user``, with the pipeline root and ``mounts`` (read-only, same path) mounted."""
    import docker
    from docker.types import Mount
    from kfp import local

    from histotransfer.core.errors import ConfigError

    try:
        client = docker.from_env()
    except docker.errors.DockerException as exc:
        raise ConfigError(f"--runner docker needs a Docker engine, and none answers: {exc}") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"image {image} is not on this machine: build it (make image, make image-gpu) and pass its tag "
            "with --image"
        ) from None
    finally:
        client.close()
    for folder in mounts:
        if not folder.is_dir():
            raise ConfigError(f"--mount {folder}: not a folder")
    pipeline_root.mkdir(parents=True, exist_ok=True)  # only once the run can start
    if user is None:  # the image's user must write the artifacts: the root is shared like /tmp
        pipeline_root.chmod(0o1777)
    return local.DockerRunner(
        user=user,
        mounts=[Mount(str(f), str(f), type="bind", read_only=True) for f in mounts],
    )


def run_local(
    pipeline: str,
    config: Path | None,
    params: list[str],
    pipeline_root: Path,
    *,
    runner: str = "subprocess",
    image: str | None = None,
    user: str | None = None,
    mounts: Sequence[Path] = (),
) -> Path | None:
    """Run a pipeline with kfp.local, in this environment or under Docker; the study returns its report
    page."""
    from kfp import local

    from components.image import IMAGE

    run_arguments = arguments(config, params, pipeline)  # fails before anything is made
    if runner == "docker":
        image = image or IMAGE
        engine = docker_runner(image, pipeline_root, user, [m.absolute() for m in mounts])
        options = PipelineOptions(image=image)
    else:
        pipeline_root.mkdir(parents=True, exist_ok=True)
        engine, options = local.SubprocessRunner(use_venv=False), PipelineOptions()
    local.init(runner=engine, pipeline_root=str(pipeline_root))
    task = build(pipeline, options)(**run_arguments)
    return Path(task.output.path) if pipeline == "study" else None


def submit(args: argparse.Namespace) -> str:
    import warnings

    import kfp

    run_arguments = arguments(args.config, args.param or [], args.pipeline)  # before any request
    probe_endpoint(args.host)  # an unreachable host fails before the compile's seconds
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(args.pipeline, Path(tmp) / f"{args.pipeline}.yaml", options_from(args))
        with kfp_endpoint(args.host):
            with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": v2 it is
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=args.host, namespace=args.namespace, existing_token=args.token)
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=run_arguments,
                run_name=args.run_name,
                experiment_name=args.experiment,
                enable_caching=None if args.caching == "default" else args.caching == "on",
            )
    return result.run_id


def add_options(p: argparse.ArgumentParser) -> None:
    """The compile-time options as flags; their defaults are PipelineOptions' (one source)."""
    defaults = PipelineOptions()
    selector = "=".join(defaults.gpu_node_selector or ())
    p.add_argument("--no-gpu", action="store_true", help="no GPU requests (CPU-only clusters)")
    p.add_argument("--gpu-node-selector", default=selector, help="KEY=VALUE or '' (default: %(default)s)")
    p.add_argument(
        "--gpu-toleration",
        default=defaults.gpu_toleration or "",
        help="taint key GPU steps tolerate, or '' (default: %(default)s)",
    )
    p.add_argument("--gcs-secret", help="Kubernetes secret holding key.json (default: workload identity)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="histotransfer pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="compile the pipelines to YAML")
    p.add_argument("--out-dir", type=Path, default=REPO / "pipelines")
    add_options(p)
    p = sub.add_parser("run-local", help="run a pipeline here with kfp.local (this environment, or Docker)")
    p.add_argument("--pipeline", choices=PIPELINES, default="study")
    p.add_argument("--config", type=Path, default=PARAMS, help="params.yaml schema (default: the demo)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="pipeline parameter (YAML value)")
    p.add_argument("--pipeline-root", type=Path, default=Path("runs/kfp-local"))
    p.add_argument(
        "--runner",
        choices=["subprocess", "docker"],
        default="subprocess",
        help="subprocess: every step in this environment; docker: every step in the image, as on a cluster",
    )
    p.add_argument("--image", help="docker: the image every step runs in (default: the components' image)")
    p.add_argument(
        "--docker-user",
        metavar="UID:GID",
        help="docker: run the steps as this user (default: the image's, uid 10001, with the pipeline root "
        "made writable for it; give $(id -u):$(id -g) to own the artifacts)",
    )
    p.add_argument(
        "--mount",
        type=Path,
        action="append",
        default=[],
        metavar="FOLDER",
        help="docker: a folder the steps read (slides, a manifest, a bundle), mounted read-only at its path",
    )
    p = sub.add_parser("submit", help="compile and start a run on a KFP endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--pipeline", choices=PIPELINES, default="study")
    p.add_argument("--config", type=Path, help="study parameters from this params.yaml-schema file")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="pipeline parameter (YAML value)")
    p.add_argument("--experiment", default="histotransfer")
    p.add_argument("--run-name")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--token", help="bearer token (default: kfp's own credential lookup)")
    p.add_argument("--caching", choices=["default", "on", "off"], default="default")
    add_options(p)
    args = parser.parse_args(argv)
    if args.command == "compile":
        options = options_from(args)
        if (existing := next((p for p in (args.out_dir, *args.out_dir.parents) if p.exists()), None)) and (
            not existing.is_dir()
        ):
            raise ConfigError(f"--out-dir {args.out_dir}: {existing} is a file; give a folder for the YAML")
        for name in PIPELINES:
            print(f"compiled {compile_pipeline(name, args.out_dir / f'{name}.yaml', options)}")
    elif args.command == "run-local":
        root = args.pipeline_root.resolve()
        if args.runner != "docker" and (args.image or args.docker_user or args.mount):
            parser.error("--image, --docker-user and --mount go with --runner docker")
        try:
            report = run_local(
                args.pipeline,
                args.config,
                args.param or [],
                root,
                runner=args.runner,
                image=args.image,
                user=args.docker_user,
                mounts=args.mount,
            )
        except RuntimeError as exc:  # kfp.local: a step failed; its own output, above, says why
            if "finished with status" not in str(exc):
                raise
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
            print(
                f"error: {message} Its output above has the reason; artifacts under {root}", file=sys.stderr
            )
            return 1
        print(f"pipeline {args.pipeline} finished; artifacts under {root}")
        if report is not None:
            print(f"  report (single page): {report}")
            print(f"  report folder: {report.parent / 'report_dir' / 'report' / 'index.html'}")
    else:
        run_id = submit(args)
        print(json.dumps({"run_id": run_id, "host": args.host, "experiment": args.experiment}))
    return 0


if __name__ == "__main__":  # through histotransfer's main: its exit statuses and one-line errors
    from histotransfer.cli import main as histotransfer_main

    sys.exit(histotransfer_main(["pipeline", *sys.argv[1:]]))
