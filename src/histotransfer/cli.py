"""The `histotransfer` command line: thin adapters from flags to library calls.

Exit status: 0 success, 1 some slides failed (the rest finished), 2 unusable input (config, manifest).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from histotransfer import __version__
from histotransfer.assets import AssetError
from histotransfer.config import ConfigError, StudyConfig, load_config
from histotransfer.manifest import ManifestError, read_manifest
from histotransfer.runner import StageResult

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. tiling.target_mpp=1.0), got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _config(args: argparse.Namespace, flag_overrides: dict[str, Any]) -> StudyConfig:
    overrides = _parse_set(getattr(args, "set", None) or [])
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
            "sample_data.lesion_fraction": args.lesion_fraction,
            "sample_data.mpp": args.mpp,
            "sample_data.tissue_pieces": args.tissue_pieces,
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


def cmd_run(args: argparse.Namespace) -> int:
    from histotransfer.study import run_study

    config = _config(args, {"output_dir": args.output_dir})
    start = time.perf_counter()
    outputs = run_study(config, overwrite=args.overwrite)
    print(f"study finished in {time.perf_counter() - start:.1f} s under {config.output_dir}")
    print(f"  cohort manifest: {outputs.manifest}")
    status = _report(outputs.stages["tile"], "  tiles (h5 + QC png)", outputs.tiles_dir)
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
    p.add_argument("out", type=Path, help="output folder (slides/, masks/, manifest.csv)")
    p.add_argument("--n-slides", type=int)
    p.add_argument("--positive-fraction", type=float)
    p.add_argument("--lesion-fraction", type=float, help="lesion area as a fraction of tissue")
    p.add_argument("--mpp", type=float, help="level-0 microns per pixel of the slides")
    p.add_argument("--tissue-pieces", type=int)
    p.add_argument("--seed", type=int)
    add_config(p)
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("tile", help="tile the slides of a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True, help="tiles folder")
    p.add_argument("--target-mpp", type=float)
    p.add_argument("--patch-size", type=int, help="tile side in pixels at the target mpp")
    p.add_argument("--overlap", type=float)
    p.add_argument("--min-tissue-fraction", type=float)
    p.add_argument("--overwrite", action="store_true", help="redo slides whose output is current")
    add_config(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("run", help="run the whole study (default config: the embedded demo)")
    p.add_argument("--output-dir", type=Path)
    p.add_argument("--overwrite", action="store_true")
    add_config(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, ManifestError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
