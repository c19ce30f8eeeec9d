"""The `histotransfer` command line: thin adapters from flags to library calls.

Exit status, decided in ``main`` only (the README's table):
  0    success
  1    some slides failed, the rest finished (their summary.csv says why); for `run`, also a stage
       that failed for one encoder while the others finished; for `verify`, an artifact that no
       longer matches what it was made from
  2    unusable input or usage: one line naming the file, row, key or folder, and the fix
  70   internal error (a bug): one line, and the traceback in a log file whose path is printed
  130  interrupted (Ctrl-C): what finished is kept, and a rerun resumes from it
  141  the reader of the output went away (`| head`): quietly, as a process killed by SIGPIPE
  143  terminated (SIGTERM: docker stop, Kubernetes): as 130
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from histotransfer import __version__
from histotransfer.assets import cache_dir
from histotransfer.config import StudyConfig, load_config, parse_assignments
from histotransfer.errors import USER_ERRORS, ConfigError, Interrupted
from histotransfer.layout import StudyLayout
from histotransfer.lifecycle import command_scope
from histotransfer.logs import configure_logging
from histotransfer.manifest import read_manifest
from histotransfer.runner import StageResult
from histotransfer.storage import check_destination, fetch_gcs, is_gcs_uri, staging_dir, upload_tree

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
EXIT_TERMINATED, EXIT_BROKEN_PIPE = 143, 141

# The modules of the install extras (pyproject.toml): the core installs predict only (the slim image).
EXTRAS = {
    **dict.fromkeys(
        ("torch", "torchvision", "timm", "sklearn", "imagecodecs", "onnx", "onnxscript"), "study"
    ),
    **dict.fromkeys(("kfp", "docker"), "pipelines"),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The message for a command that needs an install extra this installation lacks, else None."""
    extra = EXTRAS.get((exc.name or "").split(".")[0])
    if extra is None:
        return None
    return (
        f"this command needs {exc.name} (the {extra!r} extra), which this installation lacks (the core "
        f"install, or the predict image, serves predict only): pip install 'histotransfer[{extra}]', or "
        "use the full image"
    )


def _config(args: argparse.Namespace, flag_overrides: dict[str, Any]) -> StudyConfig:
    overrides = parse_assignments(getattr(args, "set", None) or [])
    overrides |= {k: v for k, v in flag_overrides.items() if v is not None}
    return load_config(args.config, overrides)


def _report(result: StageResult, what: str, where: Path) -> int:
    done = sum(o.status != "failed" for o in result.outcomes)
    print(
        f"{what}: {done} of {len(result.outcomes)} slide(s) ready in {where} (summary: {result.summary_path})"
    )
    if result.failed:
        print(result.failure_report(), file=sys.stderr)
        return EXIT_SLIDES_FAILED
    return EXIT_OK


def cmd_sample_data(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = _config(
        args,
        {
            "sample_data.n_slides": args.n_slides,
            "sample_data.positive_fraction": args.positive_fraction,
            "sample_data.lesion_types": args.lesion_types,
            "sample_data.lesion_fraction": args.lesion_fraction,
            "sample_data.tissue_pieces": args.tissue_pieces,
            "sample_data.sites": args.sites,
            "sample_data.site_mpp": args.mpp,
            "sample_data.variation": args.variation,
            "sample_data.artefacts": args.artefacts,
            "sample_data.seed": args.seed,
        },
    )
    layout = StudyLayout.of(cohort=args.out)
    manifest = stages.sample_cohort(layout, config)
    masks = layout.cohort_files.masks
    print(f"sample cohort: {manifest} ({config.sample_data.n_slides} slides, masks in {masks})")
    return EXIT_OK


def cmd_tile(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = _config(
        args,
        {
            "tiling.target_mpp": args.target_mpp,
            "tiling.patch_size_px": args.patch_size,
            "tiling.overlap": args.overlap,
            "tiling.min_tissue_fraction": args.min_tissue_fraction,
        },
    )
    layout = StudyLayout.of(manifest=args.manifest, tiles=args.out)
    result = stages.tile(layout, config, read_manifest(layout.manifest), overwrite=args.overwrite)
    return _report(result, "tiles", layout.tiles)


def cmd_extract(args: argparse.Namespace) -> int:
    from histotransfer import stages
    from histotransfer.features.extraction import settings_from

    config = _config(
        args,
        {
            "extraction.device": args.device,
            "extraction.batch_size": args.batch_size,
            "extraction.num_workers": args.num_workers,
            "extraction.precision": args.precision,
            "extraction.backend": args.backend,
        },
    )
    encoder_id = _encoder_id(args.encoder, "--encoder")
    layout = StudyLayout.of(manifest=args.manifest, tiles=args.tiles, features=args.out)
    print(f"encoder {encoder_id}: {settings_from(config.extraction)}")
    extracted = stages.extract(
        layout,
        config,
        read_manifest(layout.manifest),
        encoder_id,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    encoder = extracted.encoder
    print(f"encoder {encoder.id}: {encoder.dim}-d, weights {encoder.weights_source}")
    return _report(extracted.result, f"features {encoder.id}", layout.features_dir(str(encoder.id)))


def _encoder_id(value: str, flag: str) -> str:
    from histotransfer.encoder_ids import parse_encoder_id

    try:
        return str(parse_encoder_id(value))
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


ENCODER_COLUMNS = {
    "arch": "ARCH",
    "dim": "dim",
    "input": "input",
    "mpp": "um/px",
    "tokens": "embedding",
    "cuts": "cut points (@CUT)",
    "weights": "weights",
}
ENCODER_NOTES = (
    "ids: ARCH[@CUT][+WEIGHTS]; +random is a seeded random init, other tags need --weights FILE",
    "foundation models read their published file (--weights PATH, the file or its folder), offline;",
    "weights: hf-hub:ORG/NAME downloads it when the hub is reachable and you are logged in",
    "embedding: gap = global average pool; cls = class token; cls+mean = class token and the mean of",
    "the patch tokens (registers excluded); mean = patch tokens; attn_pool = CONCH's attentional pooler;",
    "transformers are pooled after their final norm at every cut (a Swin stage before the last: without)",
)


def cmd_encoders(args: argparse.Namespace) -> int:
    from histotransfer.features.registry import encoder_table

    rows = encoder_table()
    if args.markdown:  # the README's table
        print("| " + " | ".join(ENCODER_COLUMNS.values()) + " |")
        print("|" + "---|" * len(ENCODER_COLUMNS))
        for row in rows:
            print("| " + " | ".join(f"`{row[k]}`" if k == "arch" else row[k] for k in ENCODER_COLUMNS) + " |")
        return EXIT_OK
    narrow = [k for k in ENCODER_COLUMNS if k not in ("weights", "cuts")]
    widths = {k: max(len(ENCODER_COLUMNS[k]), *(len(r[k]) for r in rows)) for k in narrow}
    print("  ".join(ENCODER_COLUMNS[k].ljust(widths[k]) for k in narrow) + "  " + ENCODER_COLUMNS["cuts"])
    for row in rows:
        print("  ".join(row[k].ljust(widths[k]) for k in narrow) + "  " + row["cuts"])
        print(" " * (widths["arch"] + 2) + f"{row['description']}; weights: {row['weights']}")
    print("\n".join(ENCODER_NOTES))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from histotransfer.stages.study import run_study

    config = _config(args, {"output_dir": args.output_dir})  # a gs:// root arrives as its staging folder
    start = time.perf_counter()
    outputs = run_study(config, overwrite=args.overwrite)
    layout = outputs.layout
    print(f"study finished in {time.perf_counter() - start:.1f} s under {config.output_dir}")
    print(f"  cohort manifest: {layout.manifest}")
    status = _report(outputs.stages["tile"], "  tiles (h5 + QC png)", layout.tiles)
    for name, result in outputs.stages.items():
        if name.startswith("extract "):
            code = _report(result, f"  features {name.split(' ', 1)[1]}", result.summary_path.parent)
            status = max(status, code)
    for result in outputs.mil:
        auc = result.metrics["pooled"]["auc"]
        print(f"  mil {result.encoder_id}: AUC {_ci(auc)} -> {result.out_dir}")
    for what, why in outputs.errors.items():
        print(f"  {what} FAILED: {why}", file=sys.stderr)
        status = EXIT_SLIDES_FAILED
    for path in outputs.cka:
        print(f"  cka: {path}")
    if outputs.bundle is not None:
        print(f"  onnx bundle: {outputs.bundle} (histotransfer predict SLIDES --bundle {outputs.bundle} ...)")
    print(f"  report: {outputs.report} (and summary.md beside it)")
    return status


def _ci(entry: dict) -> str:
    if entry["value"] is None:
        return "n/a"
    ci = f" [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]" if entry["ci_low"] is not None else ""
    return f"{entry['value']:.3f}{ci}"


def cmd_train(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = _config(
        args,
        {
            "mil.epochs": args.epochs,
            "mil.lr": args.lr,
            "mil.folds": args.folds,
            "mil.attention": args.attention,
            "mil.selection": args.selection,
            "mil.seed": args.seed,
            "mil.seeds": args.seeds,
        },
    )
    features = Path(args.features)  # FEATURES/ENCODER_ID
    layout = StudyLayout.of(manifest=args.manifest, features=features.parent, tiles=args.tiles, mil=args.out)
    result = stages.train(
        layout, config, read_manifest(layout.manifest), features.name, overwrite=args.overwrite
    )
    pooled = result.metrics["pooled"]
    print(f"mil {result.encoder_id}{' (reused)' if result.reused else ''}: {result.out_dir}")
    for name in ("auc", "accuracy", "balanced_accuracy", "f1"):
        print(f"  {name:<18} {_ci(pooled[name])}")
    loc = result.metrics["localisation"]
    if loc["mean_auroc"] is not None:
        print(f"  attention localisation AUROC {loc['mean_auroc']:.3f} over {loc['n_slides']} slide(s)")
    seeds = result.metrics["seeds"]
    if seeds["n"] > 1 and seeds["mean"]["auc"] is not None:
        print(f"  AUC over {seeds['n']} seeds      {seeds['mean']['auc']:.3f} ± {seeds['sd']['auc']:.3f}")
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = _config(
        args,
        {
            "finetune.k": args.k,
            "finetune.epochs": args.epochs,
            "finetune.lr": args.lr,
            "finetune.head_lr": args.head_lr,
            "finetune.selection": args.selection,
            "finetune.freeze_blocks": args.freeze_blocks,
            "finetune.accumulate": args.accumulate,
            "finetune.augment": args.augment or None,
            "extraction.device": args.device,
        },
    )
    layout = StudyLayout.at(args.study, manifest=args.manifest)
    encoder_id = _encoder_id(args.encoder, "--encoder")
    result = stages.finetune(
        layout,
        config,
        read_manifest(layout.manifest),
        encoder_id,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    for fold, path in result.fold_encoders.items():
        print(f"fold {fold}: fine-tuned encoder {path}")
    print(
        f"mil {result.finetuned_id}: AUC {_ci(result.mil.metrics['pooled']['auc'])} -> {result.mil.out_dir}"
    )
    return max(EXIT_OK, *(EXIT_SLIDES_FAILED if r.failed else EXIT_OK for r in result.extraction.values()))


def cmd_cka(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = _config(
        args,
        {
            "cka.tiles": args.n_tiles,
            "cka.batch_size": args.batch_size,
            "cka.seed": args.seed,
            "cka.fold": args.fold,
            "extraction.device": args.device,
        },
    )
    if args.study is not None:  # a study's frozen encoder vs its fine-tuned copy
        if args.encoder is None or args.a or args.b or args.out or args.tiles:
            raise ConfigError(
                "--study takes --encoder ID (frozen vs fine-tuned) and writes STUDY/cka; --a/--b, --tiles "
                "and --out go without --study"
            )
        layout = StudyLayout.at(args.study, manifest=args.manifest)
        records = read_manifest(layout.manifest)
        path = stages.cka(
            layout, config, records, _encoder_id(args.encoder, "--encoder"), weights=args.weights_a
        )
    else:
        if not (args.a and args.b and args.tiles and args.out):
            raise ConfigError("give --a ID --b ID --tiles DIR --out DIR, or --study DIR --encoder ID")
        layout = StudyLayout.of(manifest=args.manifest, tiles=args.tiles, cka=args.out)
        path = stages.compare_encoders(
            layout,
            config,
            read_manifest(layout.manifest),
            _encoder_id(args.a, "--a"),
            _encoder_id(args.b, "--b"),
            weights_a=args.weights_a,
            weights_b=args.weights_b,
            name_a=args.name_a,
            name_b=args.name_b,
        )
    print(f"cka: {path} and {path.with_suffix('.png')}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from histotransfer import stages

    layout = StudyLayout.at(args.study)
    path = stages.report(layout, bundle=args.bundle, tracking=args.tracking)
    print(f"report: {path}")
    if args.tracking:
        print(f"tracking files: {layout.tracking_metrics} {layout.tracking_plots}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from histotransfer.verify import verify

    result = verify(args.path)
    print("\n".join(result.lines()))
    return EXIT_OK if result.ok else EXIT_SLIDES_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = _config(args, {"export.fp16": args.fp16 or None, "export.fold": args.fold})
    if (args.mil is None) == (args.study is None):
        raise ConfigError("give either --mil STUDY/mil/ENCODER_ID or --study STUDY (exports its best model)")
    study = StudyLayout.of_mil_result(args.mil) if args.mil is not None else StudyLayout.at(args.study)
    layout = study.replace(tiles=args.tiles)
    result = stages.export(
        layout,
        config,
        mil_dir=args.mil,
        out=args.out,
        weights=args.weights,
        expect_encoder=args.encoder,
        overwrite=args.overwrite,
    )
    spec = result.spec
    reused = " (reused)" if result.reused else ""
    print(f"bundle {result.path}{reused}: {spec.encoder.id}, MIL head of fold {spec.aggregator.fold}")
    for name, parity in spec.parity.items():
        print(f"  {name} parity vs torch: max rel {parity.max_rel:.2e} (tolerance {parity.tolerance:g})")
    print(
        f"  tiles {spec.tiling.patch_size_px} px at {spec.tiling.target_mpp:g} um/px; classes {spec.classes}"
    )
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    # torch-free: this path imports only ONNX Runtime, OpenSlide and numpy (tests/test_export.py checks)
    from histotransfer import stages
    from histotransfer.config import predict_settings

    settings = predict_settings(
        mpp=args.mpp, batch_size=args.batch_size, readers=args.readers, threads=args.threads
    )
    print(f"bundle {args.bundle}: classifying {args.slides}")
    result = stages.predict(
        args.bundle,
        args.slides,
        args.out,
        mpp=settings.mpp,
        batch_size=settings.batch_size,
        readers=settings.readers,
        threads=settings.threads,
        heatmaps=not args.no_heatmaps,
        overwrite=args.overwrite,
    )
    return _report(result, "predictions", args.out)


def cmd_pipeline(args: argparse.Namespace) -> int:
    # A command that the pipelines package (components/, pipelines/ beside the library) adds through
    # the "histotransfer.commands" entry point: the library itself never imports it, nor kfp.
    from importlib.metadata import entry_points

    found = entry_points(group="histotransfer.commands", name="pipeline")
    try:
        pipeline_main = next(iter(found)).load()
    except (StopIteration, ImportError) as exc:
        print(
            "error: `histotransfer pipeline` needs the pipelines package and kfp: install the repository "
            f"with its pipelines extra (pip install -e '.[pipelines]'){f' ({exc})' if str(exc) else ''}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    rest = args.pipeline_args[1:] if args.pipeline_args[:1] == ["--"] else args.pipeline_args
    return pipeline_main(rest)


# Commands whose output root may be gs://: they write to a local staging folder, then upload it.
OUTPUT_ARGS = {
    "sample-data": "out",
    "tile": "out",
    "extract": "out",
    "train": "out",
    "cka": "out",
    "export": "out",
    "predict": "out",
    "run": "output_dir",
}


def _path(value: str) -> Path:
    """A path flag's value; an empty one is a usage error (Path("") would be the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or folder")
    return Path(value)


def _output(value: str) -> Path | str:
    """An output root: a local Path, or a gs:// URI kept as text (Path would fold its '//')."""
    return value if is_gcs_uri(value) else _path(value)


def _run_with_remote_output(args: argparse.Namespace) -> int:
    """Run the command into the URI's staging folder (resumable), then upload it (see upload_tree)."""
    if isinstance(getattr(args, "manifest", None), str):  # a gs:// manifest: its verified local copy
        args.manifest = fetch_gcs(args.manifest)
    attr = OUTPUT_ARGS.get(args.command)
    remote = getattr(args, attr, None) if attr else None
    if not isinstance(remote, str):
        return args.func(args)
    check_destination(remote)  # credentials and bucket, before any work
    local = staging_dir(remote)
    print(f"output {remote}: written to {local} first, uploaded when the command has finished")
    setattr(args, attr, local)
    status = args.func(args)
    if status == EXIT_BAD_INPUT:
        return status
    stats = upload_tree(local, remote)
    print(f"uploaded {remote}: {stats['uploaded']} object(s) written, {stats['skipped']} already there")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histotransfer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"histotransfer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=_path, help="YAML config (params.yaml schema); flags override it")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")

    p = sub.add_parser("sample-data", help="build the sample cohort from real H&E pixels")
    p.add_argument("out", type=_output, help="output folder (slides/, masks/, manifest.csv) or gs://")
    p.add_argument("--n-slides", type=int)
    p.add_argument("--positive-fraction", type=float, help="share of slides with a lesion")
    p.add_argument("--lesion-types", nargs="+", metavar="TYPE", help="solid and/or papillary")
    p.add_argument(
        "--lesion-fraction", type=float, nargs="+", metavar="F", help="lesion area / tissue: F, or LOW HIGH"
    )
    p.add_argument("--tissue-pieces", type=int)
    p.add_argument("--sites", type=int, help="scanning sites (stain, focus, JPEG quality differ)")
    p.add_argument("--mpp", type=float, nargs="+", help="level-0 um/px of the sites' scanners, in turn")
    p.add_argument("--variation", type=float, help="strength of the site differences (0: none)")
    p.add_argument("--artefacts", type=float, help="chance per slide of a pen mark, a fold, a bubble")
    p.add_argument("--seed", type=int)
    add_config(p)
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("tile", help="tile the slides of a manifest")
    p.add_argument("manifest", type=_output, help="cohort CSV (local or gs://)")
    p.add_argument("--out", type=_output, required=True, help="tiles folder (or gs://BUCKET/FOLDER)")
    p.add_argument("--target-mpp", type=float)
    p.add_argument("--patch-size", type=int, help="tile side in pixels at the target mpp")
    p.add_argument("--overlap", type=float)
    p.add_argument("--min-tissue-fraction", type=float)
    p.add_argument("--overwrite", action="store_true", help="redo slides whose output is current")
    add_config(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("extract", help="extract patch features of tiled slides with one encoder")
    p.add_argument("manifest", type=_output, help="cohort CSV (local or gs://)")
    p.add_argument("--tiles", type=_path, required=True, help="tiles folder (from `histotransfer tile`)")
    p.add_argument("--encoder", required=True, help="ARCH[@CUT][+WEIGHTS], see `histotransfer encoders`")
    p.add_argument("--weights", help="checkpoint file, hf-hub:ORG/NAME or timm (default: per encoder id)")
    p.add_argument("--out", type=_output, required=True, help="features root; writes OUT/ENCODER_ID/*.h5")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument(
        "--backend", choices=["auto", "torch", "onnxruntime"], help="auto: torch on GPU, ORT on CPU"
    )
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="cross-validate attention-MIL on one encoder's features")
    p.add_argument("manifest", type=_output, help="cohort CSV (local or gs://)")
    p.add_argument("--features", type=_path, required=True, help="the encoder's folder: FEATURES/ENCODER_ID")
    p.add_argument("--out", type=_output, required=True, help="MIL root; writes OUT/ENCODER_ID/")
    p.add_argument(
        "--tiles", type=_path, help="tiles folder: checks alignment, enables heatmaps and localisation"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--folds", type=int)
    p.add_argument("--attention", choices=["paper", "gated"])
    p.add_argument("--selection", choices=["last", "val_loss"], help="which epoch each fold keeps")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=int, help="repeat the cross-validation with this many seeds")
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune", help="attention top-k fine-tuning in every fold, then features and MIL again"
    )
    p.add_argument("manifest", type=_output, help="cohort CSV (local or gs://)")
    p.add_argument(
        "--study", type=_path, required=True, help="folder with tiles/, features/ and mil/ of the frozen run"
    )
    p.add_argument("--encoder", required=True, help="an encoder whose frozen-feature MIL has run")
    p.add_argument("--weights", help="its weights, as given to extract")
    p.add_argument("--k", type=int, help="tiles per slide (paper: 64)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="encoder learning rate (paper: 1e-5)")
    p.add_argument("--head-lr", type=float)
    p.add_argument("--selection", choices=["attention", "random"])
    p.add_argument("--freeze-blocks", type=int)
    p.add_argument("--accumulate", type=int)
    p.add_argument("--augment", action="store_true", help="random flips and 90-degree rotations")
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "cka", help="layer-by-layer CKA: two encoders (--a, --b), or a study's frozen vs fine-tuned encoder"
    )
    p.add_argument("manifest", type=_output, help="cohort CSV (local or gs://)")
    p.add_argument("--study", type=_path, help="a study folder: compare --encoder with its fine-tuned copy")
    p.add_argument("--encoder", help="with --study: the frozen encoder id (fold cka.fold's copy is used)")
    p.add_argument("--tiles", type=_path, help="tiles folder (without --study)")
    p.add_argument("--a", help="encoder id")
    p.add_argument("--b", help="encoder id (e.g. resnet18+ft with --weights-b FILE)")
    p.add_argument("--weights-a", help="weights of --a (or of --encoder); default: per id and config")
    p.add_argument("--weights-b")
    p.add_argument("--name-a", help="name in the output file (default: the id)")
    p.add_argument("--name-b")
    p.add_argument("--out", type=_output, help="cka folder (without --study); writes OUT/A__B.json and .png")
    p.add_argument("--n-tiles", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--fold", type=int, help="with --study: the fold whose fine-tuned encoder is compared")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda ...")
    add_config(p)
    p.set_defaults(func=cmd_cka)

    p = sub.add_parser(
        "export", help="export a MIL result (one fold's head and its encoder) as an ONNX bundle"
    )
    p.add_argument("--mil", type=_path, help="the MIL result folder: STUDY/mil/ENCODER_ID")
    p.add_argument(
        "--study", type=_path, help="or a study folder: exports its best model (the report's first)"
    )
    p.add_argument("--out", type=_output, required=True, help="bundle folder, e.g. STUDY/onnx/NAME")
    p.add_argument("--encoder", help="the encoder id (checked against the MIL result; default: its id)")
    p.add_argument("--weights", help="the encoder's weights as given to extract (fine-tuned: found per fold)")
    p.add_argument("--fold", type=int, help="default: export.fold, else the fold with the lowest loss")
    p.add_argument("--tiles", type=_path, help="the study's tiles folder (default: STUDY/tiles)")
    p.add_argument("--fp16", action="store_true", help="float16 encoder for GPUs")
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify slides with an ONNX bundle (ONNX Runtime only, no torch)")
    p.add_argument("slides", help="a slide file, a gs:// URI or a manifest CSV (label column optional)")
    p.add_argument("--bundle", type=_path, required=True, help="bundle folder from `histotransfer export`")
    p.add_argument(
        "--out", type=_output, required=True, help="writes predictions.csv, slides/, heatmaps/, tiles/"
    )
    from histotransfer.config import PredictSettings  # its flags' help, defaults and bounds

    for name, field in PredictSettings.model_fields.items():
        default = f" (default {field.default})" if field.default is not None else ""
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=float if name == "mpp" else int,
            help=f"{field.description}{default}",
        )
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="(re)write a study's report from its MIL results")
    p.add_argument("study", type=_path, help="the study's output_dir")
    p.add_argument("--bundle", type=_path, help="ONNX bundle to describe (default: the study's one bundle)")
    p.add_argument(
        "--tracking",
        action="store_true",
        help="also STUDY/metrics.json and STUDY/plots/ (dvc metrics, plots)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "verify",
        help="walk an artifact's lineage: were these outputs made from these slides with these weights?",
    )
    p.add_argument(
        "path", type=_path, help="a study folder, a bundle, a predictions folder or an artifact folder"
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "pipeline", help="Kubeflow Pipelines: compile, run-local, submit (see `histotransfer pipeline -h`)"
    )
    p.add_argument("pipeline_args", nargs=argparse.REMAINDER, help="compile | run-local | submit ...")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "encoders", help="list architectures: width, input, um/px, token rule, cut points, weights"
    )
    p.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    p.set_defaults(func=cmd_encoders)

    p = sub.add_parser("run", help="run the whole study (default config: the embedded demo)")
    p.add_argument("--output-dir", type=_output, help="local folder or gs://BUCKET/FOLDER")
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_run)
    return parser


def crash_log(argv: list[str]) -> Path:
    """Write the current exception's traceback to a new log file (in the cache's logs/ folder, else
    the temporary folder) and return its path."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"histotransfer {__version__}\nargv: {argv}\n\n{traceback.format_exc()}"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        path = folder / f"histotransfer-crash-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    raise OSError("no folder to write the crash log to")


def _interrupted(exc: KeyboardInterrupt) -> int:
    terminated = getattr(exc, "signal", "SIGINT") == "SIGTERM"
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    print(f"\n{how}: outputs that finished are kept; run the same command again to resume", file=sys.stderr)
    if isinstance(exc, Interrupted) and exc.result is not None:
        result = exc.result
        done = sum(o.status != "failed" for o in result.outcomes)
        print(
            f"  {exc.stage}: {done} slide(s) finished, {len(result.failed)} failed, "
            f"{exc.remaining} left to do (summary: {result.summary_path})",
            file=sys.stderr,
        )
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run one command and map every way it can end onto the exit-status contract (module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:  # its own parser (and -h) lives in pipelines/cli.py
        argv = ["pipeline", "--", *argv[1:]]
    try:
        args = build_parser().parse_args(argv)  # usage errors exit 2 here, with argparse's message
        configure_logging(args.verbose)
        with command_scope():
            return _run_with_remote_output(args)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:  # a command of the study run where only predict is installed
        if (message := missing_extra(exc)) is None:
            return _internal_error(argv, exc)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader of the output went away (`histotransfer encoders | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a file or folder the user named cannot be read or written
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {name}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        return _internal_error(argv, exc)


def _internal_error(argv: list[str], exc: Exception) -> int:
    try:
        where = f"the traceback is in {crash_log(argv)}"
    except OSError:
        where = "no log file could be written; rerun with -v"
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    print(
        f"internal error: {type(exc).__name__}: {first}\n"
        f"  this is a bug in histotransfer; {where}: please attach it to a bug report",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
