"""The study's pictures, by what they draw: attention heatmaps on slide thumbnails, ROC curves, CKA
matrices and the truncation curve. Each is written atomically as a PNG; the data come from saved
artifacts (the tiling QC picture is drawn by histotransfer.wsi.tiling while the mask is at hand)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from histotransfer.io.atomic import atomic_path
from histotransfer.io.marks import PNG_METADATA, png_info
from histotransfer.wsi.slides import local_slide_path, open_slide


def attention_heatmap(
    slide_path: str,
    coords: np.ndarray,
    attention: np.ndarray,
    *,
    patch_size_level0: int,
    out: Path,
    max_side_px: int = 1000,
    alpha: float = 0.55,
) -> Path:
    """Thumbnail with each tile coloured by its attention rank (inferno), beside the plain thumbnail."""
    with open_slide(local_slide_path(slide_path)) as slide:
        thumb = slide.get_thumbnail((max_side_px, max_side_px)).convert("RGB")
        width, height = slide.dimensions
    sx, sy = thumb.width / width, thumb.height / height
    ranks = attention.argsort().argsort() / max(1, len(attention) - 1)  # (n_tiles,) in [0, 1]
    colours = (colormaps["inferno"](ranks)[:, :3] * 255).astype(np.uint8)  # (n_tiles, 3)
    overlay = np.asarray(thumb).copy()
    covered = np.zeros(overlay.shape[:2], dtype=bool)
    paint = np.zeros_like(overlay)
    for (x, y), colour in zip(coords, colours, strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = int(np.ceil((x + patch_size_level0) * sx)), int(np.ceil((y + patch_size_level0) * sy))
        paint[y0:y1, x0:x1] = colour
        covered[y0:y1, x0:x1] = True
    overlay[covered] = (alpha * paint[covered] + (1 - alpha) * overlay[covered]).astype(np.uint8)
    canvas = Image.new("RGB", (thumb.width * 2 + 10, thumb.height), "white")
    canvas.paste(thumb, (0, 0))
    canvas.paste(Image.fromarray(overlay), (thumb.width + 10, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG", pnginfo=png_info())
    return out


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=PNG_METADATA)
    return Path(path)


def roc_curves(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> Path:
    """ROC curves, one per name: (fpr, tpr, auc)."""
    fig = Figure(figsize=(4.6, 4.2), dpi=110)
    ax = fig.subplots()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def forest_plot(path: Path, rows: list[dict], best: str, ci: float) -> Path:
    """The AUC difference of ``best`` over each other encoder with its paired bootstrap interval, one
    line per row of ``histotransfer.mil.compare.compare_to_best`` (rows without an interval: the point)."""
    fig = Figure(figsize=(5.6, 1.1 + 0.32 * len(rows)), dpi=110)
    ax = fig.subplots()
    for i, row in enumerate(rows):
        if row["diff"] is None:
            continue
        if row["ci_low"] is not None:
            ax.plot([row["ci_low"], row["ci_high"]], [i, i], c="#3b6ea5", lw=1.8)
        ax.plot([row["diff"]], [i], "o", c="#3b6ea5", ms=4)
    ax.axvline(0, ls="--", c="grey", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["other"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"AUC of {best} minus the encoder's ({ci:.0%} paired bootstrap CI)")
    ax.xaxis.label.set_fontsize(8)
    return _save(fig, path)


def site_plot(path: Path, rows: list[tuple[str, float, float]]) -> Path:
    """Each encoder's AUC in site-mixed folds (open circle) and with its test site held out (dot), one
    line per ``(encoder, in-site AUC, out-of-site AUC)``: a long line is an encoder that learnt the site."""
    fig = Figure(figsize=(5.6, 1.1 + 0.32 * len(rows)), dpi=110)
    ax = fig.subplots()
    for i, (_, auc_in, auc_out) in enumerate(rows):
        ax.plot([auc_in, auc_out], [i, i], c="#b0b0b0", lw=1.5)
        ax.plot([auc_in], [i], "o", mfc="white", mec="#3b6ea5", ms=5)
        ax.plot([auc_out], [i], "o", c="#c0392b", ms=5)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="slide AUC: site-mixed folds (open) vs site held out (filled)")
    ax.xaxis.label.set_fontsize(8)
    return _save(fig, path)


def aggregator_matrix(path: Path, matrix: np.ndarray, encoders: list[str], aggregators: list[str]) -> Path:
    """Pooled slide AUC of each encoder (down) with each MIL head (across); NaN: not run."""
    fig = Figure(figsize=(1.8 + 0.75 * len(aggregators), 1.0 + 0.38 * len(encoders)), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.5, vmax=1, cmap="viridis", origin="upper")
    ax.set_xticks(range(len(aggregators)), aggregators, fontsize=7)
    ax.set_yticks(range(len(encoders)), encoders, fontsize=7)
    ax.set(title="slide AUC: encoder x MIL head")
    ax.title.set_fontsize(8)
    for (i, j), v in np.ndenumerate(matrix):
        if np.isfinite(v):
            ax.text(
                j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color="white" if v < 0.8 else "black"
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def cka_matrix(
    path: Path, matrix: np.ndarray, layers_a: list[str], layers_b: list[str], name_a: str, name_b: str
):
    """A layers x layers CKA matrix with its values, layers of ``name_a`` down, of ``name_b`` across."""
    fig = Figure(figsize=(1.2 + 0.55 * len(layers_b), 1.0 + 0.5 * len(layers_a)), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="upper")
    ax.set_xticks(range(len(layers_b)), layers_b, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers_a)), layers_a, fontsize=7)
    ax.set(xlabel=name_b, ylabel=name_a, title="linear CKA")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def truncation_curves(path: Path, lines: dict[str, dict[str, list]]) -> Path:
    """AUC (with its CI) and attention localisation against cut point, one line per label; each line
    holds ``cuts`` (tick labels, shallow to deep), ``auc``, ``ci_low``, ``ci_high`` and ``localisation``
    (None where unknown)."""

    def values(xs: list) -> np.ndarray:
        return np.array([v if v is not None else np.nan for v in xs], dtype=float)

    fig = Figure(figsize=(9, 3.8), dpi=110)
    ax_auc, ax_loc = fig.subplots(1, 2)
    for label, line in lines.items():
        x = np.arange(len(line["cuts"]))
        y, lo, hi = values(line["auc"]), values(line["ci_low"]), values(line["ci_high"])
        ax_auc.errorbar(
            x, y, yerr=[np.nan_to_num(y - lo), np.nan_to_num(hi - y)], marker="o", capsize=3, label=label
        )
        ax_loc.plot(x, values(line["localisation"]), marker="s", label=label)
        for ax in (ax_auc, ax_loc):
            ax.set_xticks(x, line["cuts"], rotation=30, ha="right", fontsize=7)
    ax_auc.set(title="slide AUC (95% CI) vs cut point", ylabel="AUC", ylim=(0.4, 1.03))
    ax_loc.set(title="attention localisation vs cut point", ylabel="AUROC of attention vs lesion")
    for ax in (ax_auc, ax_loc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
