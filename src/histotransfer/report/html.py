"""The study report: encoders against metrics with CIs, the truncation curve, ROC curves, attention
heatmaps and tiling QC, as ``report/index.html`` and ``report/summary.md``."""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from histotransfer.core.architectures import ARCHS, list_cut_points
from histotransfer.core.config import AGGREGATORS
from histotransfer.core.encoder_ids import RANDOM, EncoderId, frozen_id, parse_encoder_id
from histotransfer.deploy.bundle import read_spec
from histotransfer.io.atomic import write_text_atomic
from histotransfer.io.layout import BUNDLE_SPEC, MILLayout
from histotransfer.io.marks import HTML_MARK, MARKDOWN_MARK, mark
from histotransfer.io.provenance import read_json
from histotransfer.mil.compare import Predictions, compare_to_best
from histotransfer.mil.results import MILResult, class_rocs, evaluation_scalars, roc_points
from histotransfer.plots import aggregator_matrix, forest_plot, roc_curves, site_plot, truncation_curves
from histotransfer.report.verify import Verification

log = logging.getLogger(__name__)

LINEAGE_MD = "lineage.md"  # the lineage section alone (the KFP report step's Markdown artifact)
COMPARISONS_JSON = "comparisons.json"  # the paired comparisons' rows (the KFP report step's Metrics)
METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "f1": "F1"}


def family(enc: EncoderId) -> str:
    """What kind of representation an encoder id stands for, as the paper groups them."""
    if enc.tag == RANDOM:
        kind = "random init"
    elif frozen_id(str(enc)) is not None:
        kind = "fine-tuned"
    elif enc.tag:
        kind = f"given weights ({enc.tag})"
    elif ARCHS[enc.arch].published_file:  # UNI, Virchow2, ..., CTransPath, RetCCL
        kind = "pathology foundation model"
    else:
        kind = "ImageNet"
    return kind + (" · truncated" if enc.cut else "")


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.3f}"
    if entry.get("ci_low") is not None:
        text += f" [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
    return text


def _encoder(encoder_id: str) -> EncoderId | None:
    try:
        return parse_encoder_id(encoder_id)
    except ValueError:  # features made outside the registry: reported, not grouped
        return None


def _mean_sd(mean: float | None, sd: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {sd or 0:.3f}"


def _seed_cell(metrics: dict, name: str) -> str:
    """Mean ± sd of a metric over the cross-validation seeds (one seed: no spread to show)."""
    seeds = metrics.get("seeds")
    if not seeds or seeds["n"] < 2:
        return "1 seed"
    return f"{_mean_sd(seeds['mean'][name], seeds['sd'][name])} (n={seeds['n']})"


def _rows(results: Sequence[MILResult]) -> list[dict[str, str]]:
    many_seeds = any((r.metrics.get("seeds") or {}).get("n", 1) > 1 for r in results)
    rows = []
    for r in results:
        m, enc = r.metrics, _encoder(r.encoder_id)
        fold_auc = m["fold_summary"]["auc"]
        loc = m["localisation"]["mean_auroc"]
        row = {
            "encoder": r.encoder_id,
            "family": family(enc) if enc else "other",
            "cut": (enc.cut or "full") if enc else "n/a",
            "dim": str(m["feature_dim"]),
            **{name: _fmt(m["pooled"][key]) for key, name in METRIC_NAMES.items()},
            "fold AUC (mean ± sd)": _mean_sd(fold_auc["mean"], fold_auc["sd"]),
        }
        if many_seeds:
            row["AUC over seeds"] = _seed_cell(m, "auc")
            row["localisation over seeds"] = _seed_cell(m, "localisation")
        row["attention localisation AUROC"] = "n/a" if loc is None else f"{loc:.3f}"
        rows.append(row)
    return rows


def _classes_note(results: Sequence[MILResult]) -> str:
    """How metrics read for the study's classes (binary: of the second class; more: one-vs-rest)."""
    if not results:
        return ""
    classes = results[0].metrics["classes"]
    if len(classes) == 2:
        return f"; AUC and F1 of {classes[1]!r} vs {classes[0]!r}"
    return f"; {len(classes)} classes: AUC is the mean one-vs-rest AUC, F1 the macro F1"


def truncation_curve(results: Sequence[MILResult], path: Path) -> bool:
    """AUC (with CI) and localisation against cut point, one line per architecture and weights."""
    groups: dict[tuple[str, str | None], list[tuple[int, str, MILResult]]] = {}
    for r in results:
        if (enc := _encoder(r.encoder_id)) is None:
            continue
        cuts = list_cut_points(enc.arch)
        order = cuts.index(enc.cut) if enc.cut else len(cuts)
        groups.setdefault((enc.arch, enc.tag), []).append((order, enc.cut or "full", r))
    groups = {k: sorted(v, key=lambda t: t[0]) for k, v in groups.items() if len(v) > 1}
    if not groups:
        return False
    lines = {}
    for (arch, tag), points in groups.items():
        auc = [p[2].metrics["pooled"]["auc"] for p in points]
        lines[arch + (f"+{tag}" if tag else "")] = {
            "cuts": [p[1] for p in points],
            "auc": [a["value"] for a in auc],
            "ci_low": [a["ci_low"] for a in auc],
            "ci_high": [a["ci_high"] for a in auc],
            "localisation": [p[2].metrics["localisation"]["mean_auroc"] for p in points],
        }
    truncation_curves(path, lines)
    return True


def _oof_roc(r: MILResult) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of a MIL result's out-of-fold predictions, or None when there is no curve."""
    y, probs, _ = r.oof_predictions()
    return roc_points(y, probs)


def _roc_all(results: Sequence[MILResult], path: Path) -> bool:
    """Binary studies: every encoder's out-of-fold ROC; more classes: the best encoder's one-vs-rest
    curve per class."""
    curves = {}
    for r in results:
        if (points := _oof_roc(r)) is not None:
            curves[r.encoder_id] = (*points, r.metrics["pooled"]["auc"]["value"])
    if curves:
        roc_curves(path, curves, "out-of-fold ROC, all encoders")
    elif results and len(results[0].metrics["classes"]) > 2:
        y, probs, _ = results[0].oof_predictions()
        curves = class_rocs(y, probs, results[0].metrics["classes"])
        if curves:
            roc_curves(path, curves, f"{results[0].encoder_id}: out-of-fold ROC, one class vs the rest")
    return bool(curves)


def _finetune_pairs(results: Sequence[MILResult]) -> list[tuple[MILResult, MILResult]]:
    by_id = {r.encoder_id: r for r in results}
    pairs = []
    for r in results:
        if _encoder(r.encoder_id) is None or (base_id := frozen_id(r.encoder_id)) is None:
            continue
        if (base := by_id.get(base_id)) is not None:
            pairs.append((base, r))
    return pairs


PAIR_COLUMNS = (
    "encoder",
    "frozen AUC",
    "fine-tuned AUC",
    "frozen bal. acc.",
    "fine-tuned bal. acc.",
    "frozen localisation",
    "fine-tuned localisation",
)


def _pair_cells(frozen: MILResult, tuned: MILResult) -> list[str]:
    def loc(r: MILResult) -> str:
        value = r.metrics["localisation"]["mean_auroc"]
        return "n/a" if value is None else f"{value:.3f}"

    fp, tp = frozen.metrics["pooled"], tuned.metrics["pooled"]
    return [
        frozen.encoder_id,
        _fmt(fp["auc"]),
        _fmt(tp["auc"]),
        _fmt(fp["balanced_accuracy"]),
        _fmt(tp["balanced_accuracy"]),
        loc(frozen),
        loc(tuned),
    ]


def _pairs_table(pairs) -> str:
    head = "".join(f"<th>{c}</th>" for c in PAIR_COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _pair_cells(*p)) + "</tr>" for p in pairs
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _pairs_markdown(pairs) -> str:
    lines = ["| " + " | ".join(PAIR_COLUMNS) + " |", "|" + "---|" * len(PAIR_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(_pair_cells(*p)) + " |" for p in pairs])


COMPARE_COLUMNS = ("encoder", "AUC", "AUC of the best minus it [CI]", "test", "p", "p (Holm)")


def comparisons(results: Sequence[MILResult]) -> list[dict]:
    """Every encoder against the best (``results`` best first) on the slides both classified: the rows
    of ``histotransfer.mil.compare.compare_to_best``, with the study's bootstrap settings; patients are
    the resampled units where the cohort has several slides per patient. [] with fewer than two."""
    if len(results) < 2:
        return []
    older = [r.encoder_id for r in results if "evaluation" not in r.metrics or "patients" not in r.metrics]
    if older:  # written before the comparisons existed: they hold no patients nor bootstrap settings
        log.warning(
            "MIL results of %s predate paired comparisons: they are compared over slides with 1000 "
            "resamples at 95%%; train them again (histotransfer train --overwrite) for the study's settings "
            "and patient-level resampling",
            ", ".join(older),
        )
    settings = results[0].metrics.get("evaluation", {"bootstrap": 1000, "ci": 0.95})
    patients: dict[str, str] = {}
    for r in results:
        patients |= r.metrics.get("patients") or {}
    runs = [Predictions(r.encoder_id, r.oof_by_slide()) for r in results]
    return compare_to_best(
        runs,
        best=results[0].encoder_id,
        patients=patients or None,
        n_boot=settings["bootstrap"],
        ci=settings["ci"],
        seed=0,
    )


def _compare_cells(row: dict) -> list[str]:
    def num(x: float | None, fmt: str = ".3f") -> str:
        return "n/a" if x is None else format(x, fmt)

    interval = "" if row["ci_low"] is None else f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
    diff = "n/a" if row["diff"] is None else f"{row['diff']:+.3f}{interval}"
    test = "DeLong" if row["test"] == "delong" else "paired bootstrap"
    return [row["other"], num(row["auc_other"]), diff, test, num(row["p"], ".3g"), num(row["p_holm"], ".3g")]


def _compare_section(rows: list[dict], figure: Path) -> tuple[list[str], list[str]]:
    best, n_units = rows[0]["best"], max(r["n_units"] for r in rows)
    units = "patients" if any(r["n_units"] < r["n_slides"] for r in rows) else "slides"
    note = (
        f"Each encoder against the best ({best}) on the out-of-fold predictions of the slides both "
        f"classified: the AUC difference with a paired bootstrap interval that resamples {units} "
        f"({n_units}), DeLong's test for two correlated AUCs (binary studies; it treats slides as "
        "independent) or the bootstrap's two-sided p (more classes), and p adjusted for the number of "
        "comparisons (Holm). An interval that holds 0 means the data cannot tell the two apart."
    )
    parts = ["<h2>Paired comparisons</h2>", f"<p>{html.escape(note)}</p>"]
    md = ["", "## Paired comparisons", "", note, ""]
    _add_table(parts, md, COMPARE_COLUMNS, [_compare_cells(r) for r in rows])
    parts.append(f'<img src="figures/{figure.name}" alt="paired AUC differences">')
    return parts, md


def _add_table(
    parts: list[str], md: list[str], columns: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    """A table of text cells, appended to the page (escaped) and to the markdown."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    md += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(row) + " |" for row in rows]


SITE_COLUMNS = (
    "encoder",
    "AUC, site-mixed folds",
    "AUC, site held out [CI]",
    "change",
    "mean AUC within a site: mixed → held out",
    "per site: mixed → held out",
)
# an encoder ahead of another by this much in site-mixed folds, and not ahead with sites held out, is
# flagged: its advantage may have come from recognising the site
SITE_LEAD = 0.02


def site_flags(rows: Sequence[tuple[str, float, float]], lead: float = SITE_LEAD) -> list[str]:
    """One line per pair of encoders (A, B), of ``(encoder, in-site AUC, out-of-site AUC)`` rows, where
    A beats B by ``lead`` or more in site-mixed folds but does not beat B with sites held out."""
    flags = []
    for a, a_in, a_out in rows:
        for b, b_in, b_out in rows:
            if a != b and a_in - b_in >= lead and a_out <= b_out:
                flags.append(
                    f"{a}'s advantage over {b} disappears out of site: {a_in:.3f} vs {b_in:.3f} in "
                    f"site-mixed folds, {a_out:.3f} vs {b_out:.3f} with the test site held out (not tested "
                    "for significance)"
                )
    return flags


def aggregator_grid(results: Sequence[MILResult]) -> tuple[list[str], list[str], dict]:
    """The encoders that have mil.compare results, the heads in the catalogue's order, and
    ``{(encoder, head): MILResult}``: each result's own head and its compared heads'."""
    cells: dict[tuple[str, str], MILResult] = {}
    for r in results:
        compared = [MILResult.load(c.dir) for c in MILLayout(r.out_dir).compared()]
        if not compared:
            continue
        for c in [r, *compared]:
            cells[(r.encoder_id, c.metrics.get("aggregator", "unrecorded"))] = c
    encoders = list(dict.fromkeys(e for e, _ in cells))
    used = {h for _, h in cells}
    heads = [h for h in (*AGGREGATORS, "unrecorded") if h in used]
    return encoders, heads, cells


def _aggregator_section(results: Sequence[MILResult], figures: Path) -> tuple[list[str], list[str]]:
    """Encoder x MIL head (mil.compare): pooled AUC with its CI and localisation, and a matrix figure."""
    encoders, heads, cells = aggregator_grid(results)
    if not cells:
        return [], []

    def cell(result: MILResult | None) -> str:
        if result is None:
            return "—"
        loc = result.metrics["localisation"].get("mean_auroc")
        return _fmt(result.metrics["pooled"]["auc"]) + ("" if loc is None else f"; loc. {loc:.3f}")

    matrix = np.array(
        [[cells[(e, h)].metrics["pooled"]["auc"]["value"] if (e, h) in cells else np.nan for h in heads]
         for e in encoders],
        dtype=float,
    )  # fmt: skip
    figure = aggregator_matrix(figures / "aggregators.png", matrix, encoders, heads)
    lead = (
        "Each encoder's frozen features with every MIL head of mil.aggregator and mil.compare: the same "
        "folds, seeds, standardisation and restarts, so a column differs only in how tiles are pooled. "
        "Pooled out-of-fold AUC [95% CI]; loc.: tile-score localisation where lesion masks exist "
        "(docs/study.md, Aggregators, says what each head's tile scores are)."
    )
    parts, md = (
        ["<h2>Encoder x aggregator</h2>", f"<p>{html.escape(lead)}</p>"],
        ["", "## Encoder x aggregator", "", lead, ""],
    )
    _add_table(
        parts, md, ["encoder", *heads], [[e, *(cell(cells.get((e, h))) for h in heads)] for e in encoders]
    )
    parts.append(_figure("figures/" + figure.name, "slide AUC, encoder x MIL head"))
    md += ["", f"![encoder x aggregator](figures/{figure.name})"]
    return parts, md


def _site_section(results: Sequence[MILResult], figures: Path) -> tuple[list[str], list[str]]:
    """In-site vs out-of-site AUC of every encoder evaluated with ``evaluation.cv: site``."""
    table, points, skipped = [], [], []
    for r in results:
        sites = r.metrics.get("sites")
        if sites is None:
            continue
        if "skipped" in sites:
            skipped.append(f"{r.encoder_id}: {sites['skipped']}")
            continue
        auc_in, out = r.metrics["pooled"]["auc"]["value"], sites["out_of_site"]["auc"]
        if auc_in is None or out["value"] is None:
            continue

        def num(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        interval = "" if out["ci_low"] is None else f" [{out['ci_low']:.3f}, {out['ci_high']:.3f}]"
        per_site = "; ".join(
            f"{site} ({v['n_slides']}): {num(v['auc_in'])} → {num(v['auc_out'])}"
            for site, v in sites["per_site"].items()
        )
        mean = sites.get("mean_site_auc") or {}
        within = (
            "n/a"
            if mean.get("in") is None
            else f"{mean['in']:.3f} → {mean['out']:.3f} ({mean['n_sites']} sites)"
        )
        change = f"{out['value'] - auc_in:+.3f}"
        table.append(
            [r.encoder_id, f"{auc_in:.3f}", f"{out['value']:.3f}{interval}", change, within, per_site]
        )
        points.append((r.encoder_id, auc_in, out["value"]))
    if not table and not skipped:
        return [], []
    note = (
        "The same training with one scanning site held out per fold (the manifest's site column): a slide's "
        "held-out prediction comes from a model that never saw a slide of its site. Site-mixed folds reward "
        "an encoder that recognises the site (stain, scanner, compression) where the site goes with the "
        "label; an encoder whose lead vanishes here may have learnt the site rather than the tissue. Read "
        "with care: the held-out models train on fewer slides (all sites but one) than the site-mixed "
        "folds, the pooled AUC also ranks slides across sites (the mean AUC within a site does not), the "
        "interval resamples slides, not sites, and with few sites it is wide. Per site: the AUC of its "
        "slides in the site-mixed folds and held out (n/a: one class at that site)."
    )
    flags = site_flags(points)
    parts, md = (
        ["<h2>Out-of-site evaluation</h2>", f"<p>{html.escape(note)}</p>"],
        ["", "## Out-of-site evaluation", "", note, ""],
    )
    if table:
        _add_table(parts, md, SITE_COLUMNS, table)
        figure = site_plot(figures / "sites.png", points)
        parts.append(f'<img src="figures/{figure.name}" alt="in-site vs out-of-site AUC">')
    if flags:
        parts.append(
            "<p><b>Flagged:</b></p><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in flags) + "</ul>"
        )
        md += ["", "Flagged:", "", *(f"- {f}" for f in flags)]
    if skipped:
        parts.append(
            "<p>Not evaluated out of site:</p><ul>"
            + "".join(f"<li>{html.escape(x)}</li>" for x in skipped)
            + "</ul>"
        )
        md += ["", "Not evaluated out of site:", "", *(f"- {x}" for x in skipped)]
    return parts, md


PATIENT_COLUMNS = ("encoder", "slides", "slide AUC", "patients", "patient AUC [CI]", "patient balanced acc.")


def _patient_section(results: Sequence[MILResult]) -> tuple[list[str], list[str]]:
    """Patient-level metrics of every result whose cohort has patients with several slides."""
    table, skipped, rule = [], [], None
    for r in results:
        level = r.metrics.get("patient_level")
        if level is None:
            continue
        rule = level["rule"]
        if "skipped" in level:
            skipped.append(f"{r.encoder_id}: {level['skipped']}")
            continue
        auc, bacc = level["pooled"]["auc"], level["pooled"]["balanced_accuracy"]
        interval = "" if auc["ci_low"] is None else f" [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]"
        slide_auc = r.metrics["pooled"]["auc"]["value"]
        table.append(
            [
                r.encoder_id,
                str(r.metrics["n_slides"]),
                "n/a" if slide_auc is None else f"{slide_auc:.3f}",
                str(level["n_patients"]),
                "n/a" if auc["value"] is None else f"{auc['value']:.3f}{interval}",
                "n/a" if bacc["value"] is None else f"{bacc['value']:.3f}",
            ]
        )
    if rule is None:
        return [], []
    note = (
        f"Some patients have several slides. A patient's prediction is the {rule} (folds keep a patient's "
        "slides together, so one model predicted all of them); intervals resample patients."
    )
    parts = ["<h2>Patient-level results</h2>", f"<p>{html.escape(note)}</p>"]
    md = ["", "## Patient-level results", "", note, ""]
    if table:
        _add_table(parts, md, PATIENT_COLUMNS, table)
    if skipped:
        parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in skipped) + "</ul>")
        md += ["", *(f"- {x}" for x in skipped)]
    return parts, md


def _link(report_dir: Path, target: Path) -> str:
    """A relative, URL-quoted link from the report to an artifact (of the study, or elsewhere: a bundle
    given with --bundle)."""
    # abspath, not resolve: a study view links its entries elsewhere, the links must stay inside it
    return quote(os.path.relpath(os.path.abspath(target), os.path.abspath(report_dir)))


def _figure(src: str, caption: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    text = html.escape(caption)
    return f'<figure><img{cls} src="{src}" alt="{text}"><figcaption>{text}</figcaption></figure>'


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
    ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:8px}"
    "img.wide{max-width:900px}figure{margin:0 0 1em}figcaption{font-size:12px;color:#555}"
)


def _cka_section(report_dir: Path, files: Sequence[Path]) -> tuple[list[str], list[str]]:
    """HTML parts and markdown lines: each frozen vs fine-tuned CKA heatmap and its diagonal."""
    parts, md = ["<h2>CKA: frozen vs fine-tuned</h2>"], ["", "## CKA: frozen vs fine-tuned", ""]
    for path in files:
        data = read_json(
            path, redo="compare again (histotransfer cka)", keys=("a", "b", "matrix", "layers_a")
        )
        matrix = np.array(data["matrix"])
        same = [n for n in data["layers_a"] if n in data["layers_b"]]
        diagonal = {n: matrix[data["layers_a"].index(n), data["layers_b"].index(n)] for n in same}
        parts.append(
            _figure(_link(report_dir, Path(path).with_suffix(".png")), f"{data['a']} vs {data['b']}")
        )
        cells = "".join(f"<td>{html.escape(n)}: {v:.3f}</td>" for n, v in diagonal.items())
        parts.append(
            f"<p>Same layer before vs after ({data['n_examples']} tiles):</p><table><tr>{cells}</tr></table>"
        )
        md.append(
            f"{data['a']} vs {data['b']} ({data['n_examples']} tiles), same layer: "
            + ", ".join(f"{n} {v:.3f}" for n, v in diagonal.items())
        )
    return parts, md


def _lineage_section(verification: Verification) -> list[str]:
    """HTML parts: every artifact of the study, what it was made from, and whether it still matches."""
    bad = sum(not f.ok for f in verification.findings)
    verdict = "every artifact matches what it was made from" if not bad else f"{bad} artifact(s) do not match"
    rows = "".join(
        f"<tr><td><code>{html.escape(f.artifact)}</code></td><td>{html.escape(f.made_from)}</td>"
        f"<td>{'ok' if f.ok else '<b>mismatch</b>: ' + html.escape('; '.join(f.problems[:3]))}"
        f"{'' if f.ok else '<br>redo: ' + html.escape(f.redo)}"
        f"{''.join('<br><small>' + html.escape(n) + '</small>' for n in f.notes)}</td></tr>"
        for f in verification.findings
    )
    return [
        "<h2>Lineage</h2>",
        f"<p><code>histotransfer verify</code>: {verdict} (by content: recorded digests against the files, "
        "each artifact's inputs against those in the study).</p>",
        f"<table><thead><tr><th>artifact</th><th>made from</th><th>status</th></tr></thead><tbody>{rows}"
        "</tbody></table>",
    ]


def _bundle_section(report_dir: Path, bundle: Path) -> tuple[list[str], list[str]]:
    """HTML parts and markdown lines describing the exported ONNX bundle, with a link to it."""
    spec = read_spec(bundle)
    parity = ", ".join(f"{k} {v.max_rel:.1e}" for k, v in spec.parity.items())
    facts = (
        f"{spec.encoder.id} ({spec.encoder.precision}) with the {spec.aggregator.kind} MIL head of fold "
        f"{spec.aggregator.fold}; "
        f"tiles of {spec.tiling.patch_size_px} px at {spec.tiling.target_mpp:g} um/px; "
        f"classes {', '.join(spec.classes)}; ONNX vs torch relative error: {parity}"
    )
    shown = os.path.relpath(os.path.abspath(bundle), os.path.abspath(report_dir.parent))  # in the study
    command = f"histotransfer predict SLIDE_OR_MANIFEST --bundle {shown} --out predictions/"
    link = _link(report_dir, bundle / BUNDLE_SPEC)
    parts = [
        "<h2>Deployable model (ONNX)</h2>",
        f'<p><a href="{link}">{html.escape(shown)}</a>: {html.escape(facts)}.</p>',
        "<p>Classify new slides with ONNX Runtime alone (from the study folder): "
        f"<code>{html.escape(command)}</code></p>",
    ]
    md = ["", "## Deployable model (ONNX)", "", f"[{shown}]({link}): {facts}.", "", f"`{command}`"]
    return parts, md


def write_report(
    results: Sequence[MILResult],
    *,
    report_dir: Path,
    tiles_dir: Path,
    title: str = "HistoTransfer study",
    cka: Sequence[Path] = (),
    bundle: Path | None = None,
    verification: Verification | None = None,
    compared: Sequence[dict] | None = None,
) -> Path:
    """Write index.html and summary.md under ``report_dir`` (and comparisons.json with two encoders or
    more); returns the HTML path. ``verification``: the study's lineage walked
    (histotransfer.report.verify), shown as its own section. ``compared``: ``comparisons(results)``
    when the caller has it already."""
    report_dir = Path(report_dir)
    results = sorted(results, key=MILResult.rank_key)
    rows = _rows(results)
    figures = report_dir / "figures"
    has_truncation = truncation_curve(results, figures / "truncation.png")
    has_roc = _roc_all(results, figures / "roc.png")
    columns = list(rows[0]) if rows else []
    md = [
        MARKDOWN_MARK,
        f"# {title}",
        "",
        f"{len(results)} encoder(s); metrics pooled over out-of-fold predictions, 95% "
        "bootstrap CIs in brackets" + _classes_note(results) + ".",
        "",
    ]
    md += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")

    def table() -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(row[c])}</td>" for c in columns) + "</tr>" for row in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(results)} encoder(s), best first. Slide-level metrics are pooled over out-of-fold "
        "predictions (each slide predicted by the fold model that never saw it) with 95% bootstrap "
        f"confidence intervals{html.escape(_classes_note(results))}; attention localisation is the mean "
        "AUROC of tile attention against the ground-truth lesion mask over slides with a lesion, where "
        "masks exist. With several cross-validation seeds (mil.seeds), the spread over seeds shows how "
        "much of a difference between encoders is noise.</p>",
        table(),
    ]
    if compared is None:
        compared = comparisons(results)
    if compared:
        write_text_atomic(report_dir / COMPARISONS_JSON, json.dumps(mark({"rows": list(compared)}), indent=1))
        ci = results[0].metrics.get("evaluation", {"ci": 0.95})["ci"]
        forest = forest_plot(figures / "forest.png", compared, results[0].encoder_id, ci)
        compare_parts, compare_md = _compare_section(compared, forest)
        parts += compare_parts
        md += compare_md
        write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")
    sections = (
        _aggregator_section(results, figures),
        _patient_section(results),
        _site_section(results, figures),
    )
    for section_parts, section_md in sections:
        if section_parts:
            parts += section_parts
            md += section_md
            write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")
    pairs = _finetune_pairs(results)
    if pairs:
        parts += ["<h2>Frozen vs fine-tuned</h2>", _pairs_table(pairs)]
        md += ["", "## Frozen vs fine-tuned", "", _pairs_markdown(pairs)]
        write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")
    if cka:
        cka_parts, cka_md = _cka_section(report_dir, cka)
        parts += cka_parts
        md += cka_md
        write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")
    if bundle is not None:
        bundle_parts, bundle_md = _bundle_section(report_dir, Path(bundle))
        parts += bundle_parts
        md += bundle_md
        write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")
    if verification is not None:
        parts += _lineage_section(verification)
        lineage_md = ["## Lineage (histotransfer verify)", "", verification.markdown()]
        md += ["", *lineage_md]
        write_text_atomic(report_dir / "summary.md", "\n".join(md) + "\n")
        write_text_atomic(report_dir / LINEAGE_MD, "\n".join([MARKDOWN_MARK, *lineage_md]) + "\n")
    if has_truncation:
        parts += ["<h2>Truncation</h2>", '<img src="figures/truncation.png" alt="truncation curve">']
    if has_roc:
        parts += ["<h2>ROC curves</h2>", '<img src="figures/roc.png" alt="ROC curves">']
    if results:
        best = results[0]
        heatmaps = sorted(MILLayout(best.out_dir).heatmaps.glob("*.png"))
        parts.append(f"<h2>Attention heatmaps: {html.escape(best.encoder_id)}</h2>")
        parts.append("<p>Left: the slide; right: tiles coloured by attention rank (bright: high).</p>")
        parts += [_figure(_link(report_dir, p), p.stem, "wide") for p in heatmaps]
        parts += [
            f'<p><a href="{_link(report_dir, MILLayout(r.out_dir).metrics)}">{html.escape(r.encoder_id)}: '
            "metrics.json</a></p>"
            for r in results
        ]
    qc = sorted(Path(tiles_dir).glob("*.png"))
    if qc:
        parts.append("<h2>Tiling QC</h2><p>Green: tissue outline; blue: kept tiles.</p><div class='grid'>")
        parts += [_figure(_link(report_dir, p), p.stem) for p in qc]
        parts.append("</div>")
    head = f"<meta charset='utf-8'>{HTML_MARK}<title>{html.escape(title)}</title><style>{STYLE}</style>"
    page = f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"
    write_text_atomic(report_dir / "index.html", page)
    return report_dir / "index.html"


def inline_images(html_path: Path) -> str:
    """The page at ``html_path`` with every local ``<img src>`` embedded as a data URI: one file that
    shows its pictures anywhere (the KFP UI renders a single HTML file)."""
    import base64
    import re
    from urllib.parse import unquote

    folder = Path(html_path).parent

    def embed(match: re.Match) -> str:
        src = match.group(1)
        file = (folder / unquote(src)).resolve()
        if src.startswith(("data:", "http:", "https:")) or not file.is_file():
            return match.group(0)
        data = base64.b64encode(file.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    return re.sub(r'src="([^"]+\.png)"', embed, Path(html_path).read_text(encoding="utf-8"))


# what DVC's metrics.json keeps of each comparison with the best encoder
COMPARED = {
    "auc_diff_vs_best": "diff",
    "auc_diff_vs_best_ci_low": "ci_low",
    "auc_diff_vs_best_ci_high": "ci_high",
    "p_vs_best": "p",
    "p_holm_vs_best": "p_holm",
}


def compared_metrics(compared: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per encoder (not the best), the numbers of its comparison with the best that trackers keep
    (DVC's metrics.json, KFP's Metrics): ``COMPARED``'s keys."""
    return {
        c["other"]: {key: c[name] for key, name in COMPARED.items() if c[name] is not None} for c in compared
    }


def write_tracking(
    results: Sequence[MILResult],
    *,
    metrics: Path | None,
    plots: Path | None,
    compared: Sequence[dict] | None = None,
) -> None:
    """Files experiment trackers read (DVC's `metrics show` / `plots show`): a flat metrics JSON (per
    encoder: pooled metrics, the AUC interval, localisation, its comparison with the best), per-encoder
    out-of-fold ROC points as CSV, and the truncation curve's points as CSV. ``compared``:
    ``comparisons(results)`` when the caller has it already."""
    if metrics is not None:
        table = {}
        ranked = sorted(results, key=MILResult.rank_key)
        for r in ranked:
            pooled = r.metrics["pooled"]
            row = {name: pooled[name]["value"] for name in METRIC_NAMES if pooled[name]["value"] is not None}
            if pooled["auc"]["ci_low"] is not None:
                row |= {"auc_ci_low": pooled["auc"]["ci_low"], "auc_ci_high": pooled["auc"]["ci_high"]}
            if (loc := r.metrics["localisation"]["mean_auroc"]) is not None:
                row["localisation_auroc"] = loc
            row |= evaluation_scalars(r.metrics)
            seeds = r.metrics.get("seeds") or {"n": 1}
            if seeds["n"] > 1 and seeds["mean"]["auc"] is not None:
                row |= {"auc_seed_mean": seeds["mean"]["auc"], "auc_seed_sd": seeds["sd"]["auc"]}
            table[r.encoder_id] = row
        for other, numbers in compared_metrics(comparisons(ranked) if compared is None else compared).items():
            table[other] |= numbers
        write_text_atomic(metrics, json.dumps(mark(table), indent=1))
    if plots is None:
        return
    for r in results:
        if (points := _oof_roc(r)) is not None:
            lines = ["fpr,tpr", *(f"{a:.6f},{b:.6f}" for a, b in zip(*points, strict=True))]
            write_text_atomic(Path(plots) / "roc" / f"{r.encoder_id}.csv", "\n".join(lines) + "\n")
    lines = ["encoder,arch,cut,depth,auc,localisation_auroc"]
    for r in results:
        if (enc := _encoder(r.encoder_id)) is None:
            continue
        cuts = list_cut_points(enc.arch)
        depth = cuts.index(enc.cut) if enc.cut else len(cuts)
        auc = r.metrics["pooled"]["auc"]["value"]
        loc = r.metrics["localisation"]["mean_auroc"]
        values = ["" if v is None else f"{v:.6f}" for v in (auc, loc)]
        lines.append(",".join([r.encoder_id, enc.arch, enc.cut or "full", str(depth), *values]))
    write_text_atomic(Path(plots) / "truncation.csv", "\n".join(lines) + "\n")
