"""The commands: thin adapters from parsed flags to library calls (histotransfer.stages), each returning
its exit status. They read their config through the flag table (cli.flags) and say what they made
through cli.printing; the libraries they need are imported when they run (start-up, the slim image).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from histotransfer.cli import printing
from histotransfer.cli.entry import EXIT_BAD_INPUT, EXIT_OK, EXIT_SLIDES_FAILED
from histotransfer.cli.flags import flag_values, study_config
from histotransfer.core.errors import ConfigError
from histotransfer.io.layout import StudyLayout
from histotransfer.io.manifest import read_manifest
from histotransfer.io.runner import StageResult
from histotransfer.io.storage import check_destination, fetch_gcs, staging_dir, upload_tree


def _ready(result: StageResult, what: str, where: Path | str) -> int:
    printing.slides_ready(result, what, where)
    return EXIT_SLIDES_FAILED if result.failed else EXIT_OK


def _encoder_id(value: str, flag: str) -> str:
    from histotransfer.core.encoder_ids import parse_encoder_id

    try:
        return str(parse_encoder_id(value))
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


def cmd_sample_data(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = study_config(args)
    layout = StudyLayout.of(cohort=args.out)
    manifest = stages.sample_cohort(layout, config)
    masks = layout.cohort_files.masks
    printing.say(f"sample cohort: {manifest} ({config.sample_data.n_slides} slides, masks in {masks})")
    return EXIT_OK


def cmd_cohort(args: argparse.Namespace) -> int:
    from histotransfer.stages.cohort import for_artifacts

    layout = StudyLayout.of(cohort=args.out)
    stats = for_artifacts(layout, study_config(args))
    labels = ", ".join(stats["labels"])
    printing.say(f"cohort: {layout.manifest} ({stats['n_slides']} slides; labels {labels})")
    return EXIT_OK


def cmd_tile(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = study_config(args)
    layout = StudyLayout.of(manifest=args.manifest, tiles=args.out)
    result = stages.tile(layout, config, read_manifest(layout.manifest), overwrite=args.overwrite)
    return _ready(result, "tiles", layout.tiles)


def cmd_extract(args: argparse.Namespace) -> int:
    from histotransfer import stages
    from histotransfer.features.extraction import settings_from

    config = study_config(args)
    encoder_id = _encoder_id(args.encoder, "--encoder")
    layout = StudyLayout.of(manifest=args.manifest, tiles=args.tiles, features=args.out)
    printing.say(f"encoder {encoder_id}: {settings_from(config.extraction)}")
    records = read_manifest(layout.manifest)
    extracted = stages.extract(
        layout, config, records, encoder_id, weights=args.weights, overwrite=args.overwrite
    )
    encoder = extracted.encoder
    printing.say(f"encoder {encoder.id}: {encoder.dim}-d, weights {encoder.weights_source}")
    return _ready(extracted.result, f"features {encoder.id}", layout.features_dir(str(encoder.id)))


def cmd_encoders(args: argparse.Namespace) -> int:
    from histotransfer.features.registry import encoder_table

    printing.encoder_table(encoder_table(), markdown=args.markdown)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from histotransfer.stages import run_study

    config = study_config(args)  # a gs:// --output-dir arrives as its staging folder
    start = time.perf_counter()
    outputs = run_study(config, overwrite=args.overwrite)
    printing.study(outputs, time.perf_counter() - start, config.output_dir)
    slides = [r for name, r in outputs.stages.items() if name == "tile" or name.startswith("extract ")]
    failed = outputs.errors or any(r.failed for r in slides)
    return EXIT_SLIDES_FAILED if failed else EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = study_config(args)
    features = Path(args.features)  # FEATURES/ENCODER_ID
    layout = StudyLayout.of(manifest=args.manifest, features=features.parent, tiles=args.tiles, mil=args.out)
    records = read_manifest(layout.manifest)
    result = stages.train(layout, config, records, features.name, overwrite=args.overwrite)
    printing.mil_metrics(result)
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = study_config(args)
    layout = StudyLayout.at(args.study, manifest=args.manifest)
    encoder_id = _encoder_id(args.encoder, "--encoder")
    records = read_manifest(layout.manifest)
    result = stages.finetune(
        layout, config, records, encoder_id, weights=args.weights, overwrite=args.overwrite
    )
    printing.finetuned(result)
    return EXIT_SLIDES_FAILED if any(r.failed for r in result.extraction.values()) else EXIT_OK


def cmd_cka(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = study_config(args)
    if args.study is not None:  # a study's frozen encoder vs its fine-tuned copy
        if args.encoder is None or args.a or args.b or args.out or args.tiles:
            raise ConfigError(
                "--study takes --encoder ID (frozen vs fine-tuned) and writes STUDY/cka; --a/--b, --tiles "
                "and --out go without --study"
            )
        layout = StudyLayout.at(args.study, manifest=args.manifest)
        records = read_manifest(layout.manifest)
        encoder_id = _encoder_id(args.encoder, "--encoder")
        path = stages.cka(layout, config, records, encoder_id, weights=args.weights_a)
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
    printing.say(f"cka: {path} and {path.with_suffix('.png')}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from histotransfer import stages

    layout = StudyLayout.at(args.study)
    path = stages.report(layout, bundle=args.bundle, tracking=args.tracking)
    printing.say(f"report: {path}")
    if args.tracking:
        printing.say(f"tracking files: {layout.tracking_metrics} {layout.tracking_plots}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from histotransfer.report.verify import verify

    result = verify(args.path)
    printing.say(*result.lines())
    return EXIT_OK if result.ok else EXIT_SLIDES_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from histotransfer import stages

    config = study_config(args)
    if (args.mil is None) == (args.study is None):
        raise ConfigError("give either --mil STUDY/mil/ENCODER_ID or --study STUDY (exports its best model)")
    study = StudyLayout.of_mil_result(args.mil) if args.mil is not None else StudyLayout.at(args.study)
    result = stages.export(
        study.replace(tiles=args.tiles),
        config,
        mil_dir=args.mil,
        out=args.out,
        weights=args.weights,
        expect_encoder=args.encoder,
        overwrite=args.overwrite,
    )
    printing.bundle(result)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    # torch-free: this path imports only ONNX Runtime, OpenSlide and numpy
    # (tests/integration/test_export_study.py checks)
    from histotransfer import stages
    from histotransfer.core.config import predict_settings

    settings = predict_settings(**flag_values(args))
    printing.say(f"bundle {args.bundle}: classifying {args.slides}")
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
    return _ready(result, "predictions", args.out)


def cmd_pipeline(args: argparse.Namespace) -> int:
    # A command that the pipelines package (components/, pipelines/ beside the library) adds through
    # the "histotransfer.commands" entry point: the library itself never imports it, nor kfp.
    from importlib.metadata import entry_points

    found = entry_points(group="histotransfer.commands", name="pipeline")
    try:
        pipeline_main = next(iter(found)).load()
    except (StopIteration, ImportError) as exc:
        printing.error(
            "`histotransfer pipeline` needs the pipelines package and kfp: install the repository "
            f"with its pipelines extra (pip install -e '.[pipelines]'){f' ({exc})' if str(exc) else ''}"
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


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a gs:// output root is written to its staging folder (resumable), then
    uploaded (see upload_tree); a gs:// manifest is read from its verified local copy."""
    if isinstance(getattr(args, "manifest", None), str):
        args.manifest = fetch_gcs(args.manifest)
    attr = OUTPUT_ARGS.get(args.command)
    remote = getattr(args, attr, None) if attr else None
    if not isinstance(remote, str):
        return args.func(args)
    check_destination(remote)  # credentials and bucket, before any work
    local = staging_dir(remote)
    printing.say(f"output {remote}: written to {local} first, uploaded when the command has finished")
    setattr(args, attr, local)
    status = args.func(args)
    if status == EXIT_BAD_INPUT:
        return status
    stats = upload_tree(local, remote)
    printing.say(
        f"uploaded {remote}: {stats['uploaded']} object(s) written, {stats['skipped']} already there"
    )
    return status
