"""`histotransfer pipeline compile | run-local | submit`: a command this package adds to the CLI.

compile     write pipelines/study.yaml and pipelines/inference.yaml (the committed, versioned YAML)
run-local   a pipeline on this machine with kfp.local: in this environment (SubprocessRunner) or every
            step in the image under Docker (DockerRunner), as a cluster runs it
submit      compile and start a run on a Kubeflow Pipelines endpoint with kfp.Client
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histotransfer.config import parse_assignments
from pipelines.options import PARAMS, REPO, PipelineOptions, default_parameters

PIPELINES = ("study", "inference")


def build(name: str, options: PipelineOptions):
    from pipelines import inference, study

    return {"study": study.build, "inference": inference.build}[name](options)


def compile_pipeline(name: str, path: Path, options: PipelineOptions | None = None) -> Path:
    from kfp import compiler

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(name, options or PipelineOptions()), str(path))
    return path


def options_from(args: argparse.Namespace) -> PipelineOptions:
    selector = tuple(args.gpu_node_selector.split("=", 1)) if args.gpu_node_selector else None
    if selector is not None and len(selector) != 2:
        raise SystemExit("--gpu-node-selector expects KEY=VALUE")
    return PipelineOptions(
        gpu=not args.no_gpu,
        gpu_node_selector=selector,
        gpu_toleration=args.gpu_toleration or None,
        gcs_secret=args.gcs_secret,
    )


def arguments(config: Path | None, params: list[str], pipeline: str) -> dict[str, Any]:
    """Run arguments: the config file's sections (study), then --param overrides; validated."""
    from histotransfer.stages.orchestration import SECTIONS, study_config

    args: dict[str, Any] = default_parameters(config) if (config and pipeline == "study") else {}
    for key, value in parse_assignments(params, option="--param").items():  # mil={epochs: 5}, shards=8
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            value = {**args[key], **value}  # a section given in part keeps the file's other keys
        args[key] = value
    if pipeline == "study":
        study_config(**{k: v for k, v in args.items() if k in SECTIONS})  # fails early, naming the key
    return args


def docker_runner(image: str, pipeline_root: Path, user: str | None, mounts: Sequence[Path]):
    """kfp.local's DockerRunner for ``image``: each step runs in it as the image's user (uid 10001, as
    on a cluster) or ``user``, with the pipeline root and ``mounts`` (read-only, same path) mounted."""
    import docker
    from docker.types import Mount
    from kfp import local

    from histotransfer.errors import ConfigError

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
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(args.pipeline, Path(tmp) / f"{args.pipeline}.yaml", options_from(args))
        with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": we target v2
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
    p.add_argument("--no-gpu", action="store_true", help="no GPU requests (CPU-only clusters)")
    p.add_argument("--gpu-node-selector", default="nvidia.com/gpu.present=true", help="KEY=VALUE or ''")
    p.add_argument("--gpu-toleration", default="nvidia.com/gpu", help="taint key GPU steps tolerate, or ''")
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


if __name__ == "__main__":
    sys.exit(main())
