"""The `histotransfer` command line: thin adapters from flags to library calls.

Exit status: 0 success, 1 some slides failed (the rest finished), 2 unusable input (config, manifest).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from histotransfer import __version__
from histotransfer.config import StudyConfig, load_config, parse_assignments
from histotransfer.errors import (
    AssetError,
    BundleError,
    ConfigError,
    ExportError,
    FeaturesError,
    ManifestError,
    SplitError,
    TrainingError,
    WeightsError,
)
from histotransfer.logs import configure_logging
from histotransfer.manifest import read_manifest
from histotransfer.runner import StageResult
from histotransfer.storage import StorageError, fetch_gcs, is_gcs_uri, staging_dir, upload_tree

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_BAD_INPUT = 0, 1, 2


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
    from histotransfer.sample_data import build_sample_cohort

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
    manifest = build_sample_cohort(args.out, config=config.sample_data)
    print(f"sample cohort: {manifest} ({config.sample_data.n_slides} slides, masks in {args.out / 'masks'})")
    return EXIT_OK


def cmd_tile(args: argparse.Namespace) -> int:
    from histotransfer.tiling import tile_cohort

    config = _config(
        args,
        {
            "tiling.target_mpp": args.target_mpp,
            "tiling.patch_size_px": args.patch_size,
            "tiling.overlap": args.overlap,
            "tiling.min_tissue_fraction": args.min_tissue_fraction,
        },
    )
    records = read_manifest(args.manifest)
    result = tile_cohort(records, out_dir=args.out, tiling=config.tiling, overwrite=args.overwrite)
    return _report(result, "tiles", args.out)


def cmd_extract(args: argparse.Namespace) -> int:
    from histotransfer.encoders import build_encoder, parse_encoder_id
    from histotransfer.extraction import extract_cohort, settings_from

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
    try:
        encoder_id = str(parse_encoder_id(args.encoder))
    except ValueError as exc:
        raise ConfigError(f"--encoder: {exc}") from exc
    # --weights wins; else the weights the config gives this encoder (e.g. params.yaml under DVC)
    weights = args.weights or config.extraction.weights_for(encoder_id)
    records = read_manifest(args.manifest)
    settings = settings_from(config.extraction)
    encoder = build_encoder(encoder_id, weights=weights)
    print(f"encoder {encoder.id}: {encoder.dim}-d, weights {encoder.weights_source}; {settings}")
    result = extract_cohort(
        records,
        tiles_dir=args.tiles,
        out_dir=args.out,
        encoder=encoder,
        settings=settings,
        overwrite=args.overwrite,
    )
    return _report(result, f"features {encoder.id}", args.out / str(encoder.id))


def cmd_encoders(args: argparse.Namespace) -> int:
    from histotransfer.encoders import ARCHS, list_cut_points

    for name, spec in ARCHS.items():
        cuts = ", ".join(list_cut_points(name)) or "(none: not a chain of blocks)"
        print(f"{name:<20} {spec.description}\n{'':<20} default weights: {spec.default_weights}")
        print(f"{'':<20} cut points (@CUT): {cuts}")
    print("ids: ARCH[@CUT][+WEIGHTS]; +random is a seeded random init, other tags need --weights FILE")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from histotransfer.study import run_study

    config = _config(args, {"output_dir": args.output_dir})  # a gs:// root arrives as its staging folder
    start = time.perf_counter()
    outputs = run_study(config, overwrite=args.overwrite)
    print(f"study finished in {time.perf_counter() - start:.1f} s under {config.output_dir}")
    print(f"  cohort manifest: {outputs.manifest}")
    status = _report(outputs.stages["tile"], "  tiles (h5 + QC png)", outputs.tiles_dir)
    for name, result in outputs.stages.items():
        if name.startswith("extract "):
            code = _report(result, f"  features {name.split(' ', 1)[1]}", result.summary_path.parent)
            status = max(status, code)
    for result in outputs.mil:
        auc = result.metrics["pooled"]["auc"]
        print(f"  mil {result.encoder_id}: AUC {_ci(auc)} -> {result.out_dir}")
    for encoder_id, why in outputs.errors.items():
        print(f"  mil {encoder_id} FAILED: {why}", file=sys.stderr)
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
    from histotransfer.mil_stage import LesionMasks, train_mil

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
    records = read_manifest(args.manifest)
    result = train_mil(
        records,
        features_dir=args.features,
        out_dir=args.out,
        mil=config.mil,
        evaluation=config.evaluation,
        tiles_dir=args.tiles,
        lesion_masks=LesionMasks.beside(args.manifest),
        overwrite=args.overwrite,
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
    from histotransfer.encoders import build_encoder
    from histotransfer.extraction import settings_from
    from histotransfer.finetune_stage import finetune_study
    from histotransfer.mil_stage import LesionMasks

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
    settings = settings_from(config.extraction)
    study = args.study
    result = finetune_study(
        read_manifest(args.manifest),
        encoder=build_encoder(args.encoder, weights=args.weights),
        features_dir=study / "features",
        tiles_dir=study / "tiles",
        mil_dir=study / "mil",
        finetune_dir=study / "finetune",
        mil=config.mil,
        cfg=config.finetune,
        evaluation=config.evaluation,
        settings=settings,
        lesion_masks=LesionMasks.beside(args.manifest),
        overwrite=args.overwrite,
    )
    for fold, path in result.fold_encoders.items():
        print(f"fold {fold}: fine-tuned encoder {path}")
    print(
        f"mil {result.finetuned_id}: AUC {_ci(result.mil.metrics['pooled']['auc'])} -> {result.mil.out_dir}"
    )
    return max(EXIT_OK, *(EXIT_SLIDES_FAILED if r.failed else EXIT_OK for r in result.extraction.values()))


def cmd_cka(args: argparse.Namespace) -> int:
    from histotransfer.cka_stage import compare, sample_tiles, write_cka
    from histotransfer.encoders import build_encoder

    config = _config(
        args, {"cka.tiles": args.n_tiles, "cka.batch_size": args.batch_size, "cka.seed": args.seed}
    )
    a = build_encoder(args.a, weights=args.weights_a)
    b = build_encoder(args.b, weights=args.weights_b)
    tiles = sample_tiles(
        read_manifest(args.manifest), args.tiles, n_tiles=config.cka.tiles, seed=config.cka.seed
    )
    result = compare(a, b, tiles, batch_size=config.cka.batch_size, device=args.device)
    json_path, png_path = write_cka(args.out, args.name_a or str(a.id), args.name_b or str(b.id), result)
    print(f"cka {a.id} vs {b.id} on {result.n_examples} tiles: {json_path} and {png_path}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from histotransfer.mil_stage import MILResult
    from histotransfer.report import write_report

    results = MILResult.load_all(args.study / "mil")
    if not results:
        print(
            f"error: no MIL results under {args.study / 'mil'} (run `histotransfer run` or `train`)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    cka = sorted((args.study / "cka").rglob("*.json"))
    bundle = args.bundle or args.study / "onnx" / "best"
    path = write_report(
        results,
        report_dir=args.study / "report",
        tiles_dir=args.study / "tiles",
        cka=cka,
        bundle=bundle if (bundle / "bundle.json").is_file() else None,
    )
    print(f"report: {path}")
    if args.metrics or args.plots:
        from histotransfer.report import write_tracking

        write_tracking(results, metrics=args.metrics, plots=args.plots)
        print(f"tracking files: {args.metrics or ''} {args.plots or ''}".rstrip())
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from histotransfer.export import best_result, export_study_model
    from histotransfer.mil_stage import MILResult

    config = _config(args, {})
    if (args.mil is None) == (args.study is None):
        raise ConfigError("give either --mil STUDY/mil/ENCODER_ID or --study STUDY (exports its best model)")
    mil_dir = args.mil
    if args.study is not None:
        results = MILResult.load_all(args.study / "mil")
        if not results:
            raise ExportError(f"no MIL results under {args.study / 'mil'}: run the study first")
        mil_dir = best_result(results).out_dir
    encoder_id = MILResult.load(mil_dir).encoder_id if (mil_dir / "metrics.json").is_file() else None
    weights = args.weights or config.extraction.weights_for(encoder_id)
    result = export_study_model(
        mil_dir,
        out=args.out,
        weights=weights,
        fold=args.fold if args.fold is not None else config.export.fold,
        tiles_dir=args.tiles,
        fp16=args.fp16 or config.export.fp16,
        overwrite=args.overwrite,
        expect_encoder=args.encoder,
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
    from histotransfer.bundle import load_bundle
    from histotransfer.predict import predict_cohort, slides_to_classify

    bundle = load_bundle(args.bundle, threads=args.threads)
    records = slides_to_classify(args.slides, mpp=args.mpp)
    spec = bundle.spec
    print(f"bundle {bundle.path}: {spec.encoder.id}, classes {spec.classes}, on {bundle.providers[0]}")
    result = predict_cohort(
        records,
        bundle,
        out_dir=args.out,
        batch_size=args.batch_size,
        readers=args.readers,
        heatmaps=not args.no_heatmaps,
        overwrite=args.overwrite,
    )
    return _report(result, "predictions", args.out)


def cmd_pipeline(args: argparse.Namespace) -> int:
    # The pipelines live beside the library in the repository (components/, pipelines/), not in it:
    # the library never imports kfp. Run this from the repository root.
    root = Path.cwd()
    if (root / "pipelines" / "cli.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from pipelines.cli import main as pipeline_main
    except ImportError as exc:
        print(
            f"error: `histotransfer pipeline` runs from a checkout of the repository root with the "
            f"pipelines extra installed (pip install -e '.[pipelines]'): {exc}",
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


def _output(value: str) -> Path | str:
    """An output root: a local Path, or a gs:// URI kept as text (Path would fold its '//')."""
    return value if is_gcs_uri(value) else Path(value)


def _run_with_remote_output(args: argparse.Namespace) -> int:
    """Run the command into the URI's staging folder (resumable), then upload it (see upload_tree)."""
    if isinstance(getattr(args, "manifest", None), str):  # a gs:// manifest: its verified local copy
        args.manifest = fetch_gcs(args.manifest)
    attr = OUTPUT_ARGS.get(args.command)
    remote = getattr(args, attr, None) if attr else None
    if not isinstance(remote, str):
        return args.func(args)
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
        p.add_argument("--config", type=Path, help="YAML config (params.yaml schema); flags override it")
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
    p.add_argument("--tiles", type=Path, required=True, help="tiles folder (from `histotransfer tile`)")
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
    p.add_argument("--features", type=Path, required=True, help="the encoder's folder: FEATURES/ENCODER_ID")
    p.add_argument("--out", type=_output, required=True, help="MIL root; writes OUT/ENCODER_ID/")
    p.add_argument(
        "--tiles", type=Path, help="tiles folder: checks alignment, enables heatmaps and localisation"
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
        "--study", type=Path, required=True, help="folder with tiles/, features/ and mil/ of the frozen run"
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

    p = sub.add_parser("cka", help="layer-by-layer CKA of two encoders on the same tiles")
    p.add_argument("manifest", type=_output, help="cohort CSV (local or gs://)")
    p.add_argument("--tiles", type=Path, required=True)
    p.add_argument("--a", required=True, help="encoder id")
    p.add_argument("--b", required=True, help="encoder id (e.g. resnet18+ft with --weights-b FILE)")
    p.add_argument("--weights-a")
    p.add_argument("--weights-b")
    p.add_argument("--name-a", help="name in the output file (default: the id)")
    p.add_argument("--name-b")
    p.add_argument("--out", type=_output, required=True, help="cka folder; writes OUT/A__B.json and .png")
    p.add_argument("--n-tiles", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    add_config(p)
    p.set_defaults(func=cmd_cka)

    p = sub.add_parser(
        "export", help="export a MIL result (one fold's head and its encoder) as an ONNX bundle"
    )
    p.add_argument("--mil", type=Path, help="the MIL result folder: STUDY/mil/ENCODER_ID")
    p.add_argument(
        "--study", type=Path, help="or a study folder: exports its best model (the report's first)"
    )
    p.add_argument("--out", type=_output, required=True, help="bundle folder, e.g. STUDY/onnx/NAME")
    p.add_argument("--encoder", help="the encoder id (checked against the MIL result; default: its id)")
    p.add_argument("--weights", help="the encoder's weights as given to extract (fine-tuned: found per fold)")
    p.add_argument("--fold", type=int, help="default: the fold with the lowest validation loss")
    p.add_argument("--tiles", type=Path, help="the study's tiles folder (default: STUDY/tiles)")
    p.add_argument("--fp16", action="store_true", help="float16 encoder for GPUs")
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify slides with an ONNX bundle (ONNX Runtime only, no torch)")
    p.add_argument("slides", help="a slide file, a gs:// URI or a manifest CSV (label column optional)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder from `histotransfer export`")
    p.add_argument(
        "--out", type=_output, required=True, help="writes predictions.csv, slides/, heatmaps/, tiles/"
    )
    p.add_argument("--mpp", type=float, help="um/px of a single slide that records no resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--readers", type=int, help="tile reader threads (default: one per core, max 8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="(re)write a study's report from its MIL results")
    p.add_argument("study", type=Path, help="the study's output_dir")
    p.add_argument("--bundle", type=Path, help="ONNX bundle to describe (default: STUDY/onnx/best if any)")
    p.add_argument("--metrics", type=Path, help="also write a flat metrics JSON here (dvc metrics)")
    p.add_argument("--plots", type=Path, help="also write ROC and truncation CSVs here (dvc plots)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "pipeline", help="Kubeflow Pipelines: compile, run-local, submit (see `histotransfer pipeline -h`)"
    )
    p.add_argument("pipeline_args", nargs=argparse.REMAINDER, help="compile | run-local | submit ...")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("encoders", help="list architectures, cut points and default weights")
    p.set_defaults(func=cmd_encoders)

    p = sub.add_parser("run", help="run the whole study (default config: the embedded demo)")
    p.add_argument("--output-dir", type=_output, help="local folder or gs://BUCKET/FOLDER")
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:  # its own parser (and -h) lives in pipelines/cli.py
        argv = ["pipeline", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return _run_with_remote_output(args)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SLIDES_FAILED
    except (
        ConfigError,
        ManifestError,
        AssetError,
        WeightsError,
        FeaturesError,
        SplitError,
        BundleError,
        ExportError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SLIDES_FAILED


if __name__ == "__main__":
    sys.exit(main())
