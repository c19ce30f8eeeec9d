"""The argument parser: each command's own arguments (inputs, outputs, ids) written here, its config
flags made from the schema (cli.flags.FLAGS), then --overwrite, --config and --set where it takes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from histotransfer import __version__
from histotransfer.cli import commands
from histotransfer.cli.flags import FLAGS, add_flags, output, path

DESCRIPTION = "The `histotransfer` command line: thin adapters from flags to library calls."
MANIFEST_HELP = "cohort CSV (local or gs://)"


def _sample_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=output, help="output folder (slides/, masks/, manifest.csv) or gs://")


def _cohort(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "out", type=path, help="the cohort folder: OUT/manifest.csv (+ slides/, masks/ when sampled)"
    )


def _tile(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=output, help=MANIFEST_HELP)
    p.add_argument("--out", type=output, required=True, help="tiles folder (or gs://BUCKET/FOLDER)")


def _extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=output, help=MANIFEST_HELP)
    p.add_argument("--tiles", type=path, required=True, help="tiles folder (from `histotransfer tile`)")
    p.add_argument("--encoder", required=True, help="ARCH[@CUT][+WEIGHTS], see `histotransfer encoders`")
    p.add_argument("--weights", help="checkpoint file, hf-hub:ORG/NAME or timm (default: per encoder id)")
    p.add_argument("--out", type=output, required=True, help="features root; writes OUT/ENCODER_ID/*.h5")


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=output, help=MANIFEST_HELP)
    p.add_argument("--features", type=path, required=True, help="the encoder's folder: FEATURES/ENCODER_ID")
    p.add_argument("--out", type=output, required=True, help="MIL root; writes OUT/ENCODER_ID/")
    p.add_argument(
        "--tiles", type=path, help="tiles folder: checks alignment, enables heatmaps and localisation"
    )


def _finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=output, help=MANIFEST_HELP)
    p.add_argument(
        "--study", type=path, required=True, help="folder with tiles/, features/ and mil/ of the frozen run"
    )
    p.add_argument("--encoder", required=True, help="an encoder whose frozen-feature MIL has run")
    p.add_argument("--weights", help="its weights, as given to extract")


def _cka(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=output, help=MANIFEST_HELP)
    p.add_argument("--study", type=path, help="a study folder: compare --encoder with its fine-tuned copy")
    p.add_argument("--encoder", help="with --study: the frozen encoder id (fold cka.fold's copy is used)")
    p.add_argument("--tiles", type=path, help="tiles folder (without --study)")
    p.add_argument("--a", help="encoder id")
    p.add_argument("--b", help="encoder id (e.g. resnet18+ft with --weights-b FILE)")
    p.add_argument("--weights-a", help="weights of --a (or of --encoder); default: per id and config")
    p.add_argument("--weights-b")
    p.add_argument("--name-a", help="name in the output file (default: the id)")
    p.add_argument("--name-b")
    p.add_argument("--out", type=output, help="cka folder (without --study); writes OUT/A__B.json and .png")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mil", type=path, help="the MIL result folder: STUDY/mil/ENCODER_ID")
    p.add_argument(
        "--study", type=path, help="or a study folder: exports its best model (the report's first)"
    )
    p.add_argument("--out", type=output, required=True, help="bundle folder, e.g. STUDY/onnx/NAME")
    p.add_argument("--encoder", help="the encoder id (checked against the MIL result; default: its id)")
    p.add_argument("--weights", help="the encoder's weights as given to extract (fine-tuned: found per fold)")
    p.add_argument("--tiles", type=path, help="the study's tiles folder (default: STUDY/tiles)")


def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", help="a slide file, a gs:// URI or a manifest CSV (label column optional)")
    p.add_argument("--bundle", type=path, required=True, help="bundle folder from `histotransfer export`")
    p.add_argument(
        "--out", type=output, required=True, help="writes predictions.csv, slides/, heatmaps/, tiles/"
    )
    p.add_argument("--no-heatmaps", action="store_true")


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=path, help="the study's output_dir")
    p.add_argument("--bundle", type=path, help="ONNX bundle to describe (default: the study's one bundle)")
    p.add_argument(
        "--tracking",
        action="store_true",
        help="also STUDY/metrics.json and STUDY/plots/ (dvc metrics, plots)",
    )


def _verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", type=path, help="a study folder, a bundle, a predictions folder or an artifact folder"
    )


def _pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline_args", nargs=argparse.REMAINDER, help="compile | run-local | submit ...")


def _encoders(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="as the markdown table in docs/encoders.md")


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    overwrite: bool = True  # takes --overwrite
    config: bool = True  # takes --config and --set


COMMANDS = {
    "sample-data": Command(
        commands.cmd_sample_data,
        "build the sample cohort from real H&E pixels",
        _sample_data,
        overwrite=False,
    ),
    "cohort": Command(
        commands.cmd_cohort,
        "the study's cohort folder: a copy of the config's manifest, else the sample cohort (DVC's stage)",
        _cohort,
        overwrite=False,
    ),
    "tile": Command(commands.cmd_tile, "tile the slides of a manifest", _tile),
    "extract": Command(
        commands.cmd_extract, "extract patch features of tiled slides with one encoder", _extract
    ),
    "train": Command(commands.cmd_train, "cross-validate attention-MIL on one encoder's features", _train),
    "finetune": Command(
        commands.cmd_finetune,
        "attention top-k fine-tuning in every fold, then features and MIL again",
        _finetune,
    ),
    "cka": Command(
        commands.cmd_cka,
        "layer-by-layer CKA: two encoders (--a, --b), or a study's frozen vs fine-tuned encoder",
        _cka,
        overwrite=False,
    ),
    "export": Command(
        commands.cmd_export,
        "export a MIL result (one fold's head and its encoder) as an ONNX bundle",
        _export,
    ),
    "predict": Command(
        commands.cmd_predict,
        "classify slides with an ONNX bundle (ONNX Runtime only, no torch)",
        _predict,
        config=False,
    ),
    "report": Command(
        commands.cmd_report,
        "(re)write a study's report from its MIL results",
        _report,
        overwrite=False,
        config=False,
    ),
    "verify": Command(
        commands.cmd_verify,
        "walk an artifact's lineage: were these outputs made from these slides with these weights?",
        _verify,
        overwrite=False,
        config=False,
    ),
    "pipeline": Command(
        commands.cmd_pipeline,
        "Kubeflow Pipelines: compile, run-local, submit (see `histotransfer pipeline -h`)",
        _pipeline,
        overwrite=False,
        config=False,
    ),
    "encoders": Command(
        commands.cmd_encoders,
        "list architectures: width, input, um/px, token rule, cut points, weights",
        _encoders,
        overwrite=False,
        config=False,
    ),
    "run": Command(
        commands.cmd_run,
        "run the whole study (bare, without --config or --set: the embedded demo)",
        lambda p: None,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histotransfer", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"histotransfer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        command.arguments(p)
        if name in FLAGS:
            add_flags(p, name)
        if command.overwrite:
            p.add_argument("--overwrite", action="store_true", help="redo outputs that are already current")
        if command.config:
            p.add_argument("--config", type=path, help="YAML config (params.yaml schema); flags override it")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
        p.set_defaults(func=command.run)
    return parser
