"""What the commands say: a line per stage result, the study's summary, MIL metrics, the encoder table,
and the lines of the exit-status contract (an error, an interruption, a bug). Results go to stdout;
failures, errors and interruptions to stderr. No function here decides an exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from histotransfer.core.errors import Interrupted
from histotransfer.io.runner import StageResult


def say(*lines: str) -> None:
    for line in lines:
        print(line)


def warn(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


# ---- the exit-status contract's lines (histotransfer.cli.entry) -------------------------------------


def error(message: str) -> None:
    """The one ``error:`` line of an unusable input (exit status 2)."""
    warn(f"error: {message}")


def interrupted(exc: KeyboardInterrupt, *, terminated: bool) -> None:
    """What was kept and how to resume (exit status 130, or 143 for SIGTERM)."""
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    warn(f"\n{how}: outputs that finished are kept; run the same command again to resume")
    if isinstance(exc, Interrupted) and exc.result is not None:
        result = exc.result
        done = sum(o.status != "failed" for o in result.outcomes)
        warn(
            f"  {exc.stage}: {done} slide(s) finished, {len(result.failed)} failed, "
            f"{exc.remaining} left to do (summary: {result.summary_path})"
        )


def internal_error(exc: Exception, where: str) -> None:
    """A bug (exit status 70): its first line, and ``where`` its traceback is."""
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    warn(
        f"internal error: {type(exc).__name__}: {first}\n"
        f"  this is a bug in histotransfer; {where}: please attach it to a bug report"
    )


# ---- stage results -----------------------------------------------------------------------------------


def slides_ready(result: StageResult, what: str, where: Path | str) -> None:
    """``WHAT: N of M slide(s) ready in WHERE``, and the failed slides' report on stderr."""
    done = sum(o.status != "failed" for o in result.outcomes)
    say(
        f"{what}: {done} of {len(result.outcomes)} slide(s) ready in {where} (summary: {result.summary_path})"
    )
    if result.failed:
        warn(result.failure_report())


def ci(entry: dict) -> str:
    """A metric with its confidence interval: ``0.912 [0.850, 0.960]``, or n/a."""
    if entry["value"] is None:
        return "n/a"
    interval = f" [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]" if entry["ci_low"] is not None else ""
    return f"{entry['value']:.3f}{interval}"


def study(outputs: Any, seconds: float, output_dir: Path) -> None:
    """`histotransfer run`'s summary: one line per stage result, failed stages on stderr."""
    layout = outputs.layout
    say(f"study finished in {seconds:.1f} s under {output_dir}", f"  cohort manifest: {layout.manifest}")
    slides_ready(outputs.stages["tile"], "  tiles (h5 + QC png)", layout.tiles)
    for name, result in outputs.stages.items():
        if name.startswith("extract "):
            slides_ready(result, f"  features {name.split(' ', 1)[1]}", result.summary_path.parent)
    for result in outputs.mil:
        say(f"  mil {result.encoder_id}: AUC {ci(result.metrics['pooled']['auc'])} -> {result.out_dir}")
    for what, why in outputs.errors.items():
        warn(f"  {what} FAILED: {why}")
    say(*(f"  cka: {path}" for path in outputs.cka))
    if outputs.bundle is not None:
        say(f"  onnx bundle: {outputs.bundle} (histotransfer predict SLIDES --bundle {outputs.bundle} ...)")
    say(f"  report: {outputs.report} (and summary.md beside it)")


def mil_metrics(result: Any) -> None:
    """A MIL result: its folder, pooled metrics, attention localisation, spread over seeds."""
    pooled = result.metrics["pooled"]
    say(f"mil {result.encoder_id}{' (reused)' if result.reused else ''}: {result.out_dir}")
    say(*(f"  {name:<18} {ci(pooled[name])}" for name in ("auc", "accuracy", "balanced_accuracy", "f1")))
    loc = result.metrics["localisation"]
    if loc["mean_auroc"] is not None:
        say(f"  attention localisation AUROC {loc['mean_auroc']:.3f} over {loc['n_slides']} slide(s)")
    seeds = result.metrics["seeds"]
    if seeds["n"] > 1 and seeds["mean"]["auc"] is not None:
        say(f"  AUC over {seeds['n']} seeds      {seeds['mean']['auc']:.3f} ± {seeds['sd']['auc']:.3f}")


def finetuned(result: Any) -> None:
    say(*(f"fold {fold}: fine-tuned encoder {path}" for fold, path in result.fold_encoders.items()))
    say(f"mil {result.finetuned_id}: AUC {ci(result.mil.metrics['pooled']['auc'])} -> {result.mil.out_dir}")


def bundle(result: Any) -> None:
    spec = result.spec
    reused = " (reused)" if result.reused else ""
    say(f"bundle {result.path}{reused}: {spec.encoder.id}, MIL head of fold {spec.aggregator.fold}")
    for name, parity in spec.parity.items():
        say(f"  {name} parity vs torch: max rel {parity.max_rel:.2e} (tolerance {parity.tolerance:g})")
    say(f"  tiles {spec.tiling.patch_size_px} px at {spec.tiling.target_mpp:g} um/px; classes {spec.classes}")


# ---- `histotransfer encoders` ------------------------------------------------------------------------

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


def encoder_table(rows: list[dict[str, str]], *, markdown: bool) -> None:
    """The registry's architectures: aligned columns and notes, or the markdown table in docs/encoders.md."""
    if markdown:
        say("| " + " | ".join(ENCODER_COLUMNS.values()) + " |", "|" + "---|" * len(ENCODER_COLUMNS))
        for row in rows:
            say("| " + " | ".join(f"`{row[k]}`" if k == "arch" else row[k] for k in ENCODER_COLUMNS) + " |")
        return
    narrow = [k for k in ENCODER_COLUMNS if k not in ("weights", "cuts")]
    widths = {k: max(len(ENCODER_COLUMNS[k]), *(len(r[k]) for r in rows)) for k in narrow}
    say("  ".join(ENCODER_COLUMNS[k].ljust(widths[k]) for k in narrow) + "  " + ENCODER_COLUMNS["cuts"])
    for row in rows:
        say("  ".join(row[k].ljust(widths[k]) for k in narrow) + "  " + row["cuts"])
        say(" " * (widths["arch"] + 2) + f"{row['description']}; weights: {row['weights']}")
    say(*ENCODER_NOTES)
