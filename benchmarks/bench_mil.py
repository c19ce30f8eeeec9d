"""Attention-MIL on small lesions: our trainer next to a plain reference loop of the paper's protocol,
on the same features and the same test folds, in one run.

The cohort is the sample cohort's real tissue (stain, focus and JPEG vary by site), with lesions of a
fixed share of the tissue per setting: one cohort holds the negatives once and a set of positives per
lesion fraction; a setting (n slides, fraction f) takes n/2 negatives and n/2 positives of fraction f.
Tiles and features (``--encoder``, default EfficientNet-Lite0 ImageNet) are made once and cached under
``--work``. Per setting and seed, both methods cross-validate (5 folds, stratified, same seed) and we
print the pooled out-of-fold AUC and the attention localisation (mean AUROC of tile attention against
the lesion mask over positive slides), mean +/- sd over seeds. ``--ablate`` also runs our trainer with
one default changed at a time (the measurements behind docs/adr/0010-mil-training.md), and
``--aggregators`` our trainer with other heads (the same folds, seeds, standardisation and restarts).

    python benchmarks/bench_mil.py [--sizes 16 48 96] [--fractions 0.01 0.03 0.1] [--seeds 3] [--ablate]
        [--aggregators gated clam_sb transmil mean max]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from histotransfer.core.config import (
    EvaluationConfig,
    MILConfig,
    SampleDataConfig,
    StudyConfig,
)
from histotransfer.io.assets import cache_dir
from histotransfer.io.layout import StudyLayout
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.mil.model import AGGREGATORS

ABLATIONS = {
    "no standardisation": {"standardize": False},
    "one init (no restarts)": {"restarts": 1},
    "cosine lr": {"schedule": "cosine"},
    "val-loss selection (holdout)": {"selection": "val_loss"},
    "no class weights": {"class_weighting": False},
}


# ---- the reference: the paper's head and protocol, written plainly ------------------------------------


def reference_fold(bags, labels, train_ids, *, seed: int, epochs: int = 20, lr: float = 1e-3):
    """Paper: Linear(D,256)-ReLU-Linear(256,64)-ReLU, attention Linear(64,32)-Tanh-Linear(32,1) with a
    softmax over the bag, Linear(64,2) on the attended sum; Adam, one slide per step, last epoch."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim = bags[train_ids[0]].shape[1]
    embed = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
    attend = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 1))
    classify = nn.Linear(64, 2)
    params = [*embed.parameters(), *attend.parameters(), *classify.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)

    def forward(x):
        h = embed(x)  # (n_tiles, 64)
        a = torch.softmax(attend(h).squeeze(-1), dim=0)  # (n_tiles,)
        return classify(a @ h), a

    for _ in range(epochs):
        for slide_id in rng.permutation(np.array(train_ids)):
            logits, _ = forward(bags[slide_id])
            loss = nn.functional.cross_entropy(logits[None], torch.tensor([labels[slide_id]]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def predict(x):
        with torch.no_grad():
            logits, a = forward(x)
            return torch.softmax(logits, 0).numpy(), a.numpy()

    return predict


# ---- the cohort, made once ----------------------------------------------------------------------------


def build(work: Path, *, n_per_class: int, fractions: list[float], encoder_id: str, pieces: int):
    """Slides, tiles and features of the benchmark cohort: (records, its layout, encoder id)."""
    from histotransfer import stages
    from histotransfer.wsi.sample_data import NEGATIVE, POSITIVE, SlideSpec, plan_sites, write_cohort

    config = SampleDataConfig(site_mpp=[0.5], artefacts=0.0, tissue_pieces=pieces, seed=11)
    name = f"cohort-{n_per_class}-{'-'.join(f'{f:g}' for f in fractions)}-p{pieces}"
    cohort = work / name
    layout = StudyLayout.at(cohort, manifest=cohort / "manifest.csv")  # tiles/ and features/ beside it
    sites = plan_sites(config)
    if not layout.cohort_files.meta.is_file():
        specs = [SlideSpec(f"neg-{i:03d}", NEGATIVE, site=i % len(sites)) for i in range(n_per_class)]
        for f in fractions:
            specs += [
                SlideSpec(
                    f"pos{f:g}-{i:03d}", POSITIVE, site=i % len(sites), lesion_type="solid", lesion_fraction=f
                )
                for i in range(n_per_class)
            ]
        print(f"building the benchmark cohort ({len(specs)} slides) in {cohort} (once)", flush=True)
        write_cohort(cohort, specs, sites, tissue_pieces=pieces, seed=config.seed, variation=config.variation)
    records = read_manifest(layout.manifest)
    study = StudyConfig(manifest=layout.manifest, extraction={"encoders": [{"id": encoder_id}]})
    stages.tile(layout, study, records)
    encoder = stages.extract(layout, study, records, encoder_id).encoder
    return records, layout, str(encoder.id)


def subset(records: list[SlideRecord], n: int, fraction: float) -> list[SlideRecord]:
    negatives = [r for r in records if r.slide_id.startswith("neg-")][: n // 2]
    positives = [r for r in records if r.slide_id.startswith(f"pos{fraction:g}-")][: n // 2]
    return negatives + positives


# ---- one run: a method on a setting with a seed ----------------------------------------------------------


def run(job) -> tuple:
    """(setting, method, seed, auc, localisation, seconds) of one cross-validation."""
    import torch
    from sklearn.metrics import roc_auc_score

    from histotransfer.features.bags import BagStore
    from histotransfer.mil.crossval import LesionMasks, cross_validate, lesion_labels, localisation_summary
    from histotransfer.mil.splits import make_folds
    from histotransfer.mil.training import SlidePrediction

    torch.set_num_threads(1)
    (n, fraction), method, overrides, seed, records, layout, encoder_id = job
    store = BagStore(records, layout.features_dir(encoder_id), classes=["normal", "tumor"], cache_gb=8)
    lesions = lesion_labels(
        records, store, layout.tiles, LesionMasks.beside(layout.manifest), EvaluationConfig()
    )
    start = time.perf_counter()
    if method == "reference":
        bags = {r.slide_id: store.features(r.slide_id) for r in records}
        labels = {s: store.label(s) for s in bags}
        preds = []
        for fold in make_folds(records, n_folds=5, val_fraction=0.0, seed=seed):
            predict = reference_fold(bags, labels, [*fold.train, *fold.val], seed=seed * 1000 + fold.index)
            for s in fold.test:
                probs, attention = predict(bags[s])
                preds.append(SlidePrediction(s, labels[s], fold.index, probs, attention))
    else:
        cfg = MILConfig(seed=seed, **overrides)
        preds = cross_validate(records, cfg, n_classes=2, store_for=lambda _: store)
    seconds = time.perf_counter() - start
    y = np.array([p.label for p in preds])
    auc = roc_auc_score(y, np.array([p.probs[1] for p in preds]))
    return (n, fraction), method, seed, auc, localisation_summary(preds, lesions)["mean_auroc"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 48, 96])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--pieces", type=int, default=4, help="tissue pieces per slide (4: ~140 tiles)")
    parser.add_argument("--ablate", action="store_true", help="also our trainer with one default changed")
    parser.add_argument(
        "--aggregators",
        nargs="+",
        default=[],
        choices=[a for a in AGGREGATORS if a != "abmil"],
        help="also our trainer with these heads (mil.aggregator; `ours` is abmil, the paper's)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench" / "mil")
    args = parser.parse_args()
    records, layout, encoder_id = build(
        args.work,
        n_per_class=max(args.sizes) // 2,
        fractions=args.fractions,
        encoder_id=args.encoder,
        pieces=args.pieces,
    )
    methods = (
        {"ours": {}, "reference": {}}
        | {f"ours, {a}": {"aggregator": a} for a in args.aggregators}
        | (ABLATIONS if args.ablate else {})
    )
    settings = [(n, f) for f in args.fractions for n in args.sizes]
    jobs = [
        ((n, f), method, overrides, seed, subset(records, n, f), layout, encoder_id)
        for (n, f) in settings
        for method, overrides in methods.items()
        for seed in range(args.seeds)
    ]
    print(f"{len(jobs)} cross-validations ({encoder_id} features, {args.seeds} seeds), {args.jobs} processes")
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(tqdm(pool.map(run, jobs), total=len(jobs), desc="bench_mil", unit="run"))

    def stats(setting, method, index):
        values = np.array([r[index] for r in results if r[0] == setting and r[1] == method], dtype=float)
        return values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0

    print(f"\n{'slides':>6} {'lesion':>7} | {'method':<30} {'AUC':>14} {'localisation':>14} {'s/run':>7}")
    worse = []
    for setting in settings:
        for method in methods:
            auc, auc_sd = stats(setting, method, 3)
            loc, loc_sd = stats(setting, method, 4)
            sec, _ = stats(setting, method, 5)
            print(
                f"{setting[0]:>6} {setting[1]:>7.0%} | {method:<30} {auc:>7.3f} ± {auc_sd:.3f} "
                f"{loc:>7.3f} ± {loc_sd:.3f} {sec:>7.1f}"
            )
        ref = stats(setting, "reference", 3)[0]
        for method in ["ours", *(m for m in methods if m.startswith("ours, "))]:
            ours = stats(setting, method, 3)[0]
            if ours < ref:
                worse.append(
                    f"{setting[0]} slides, {setting[1]:.0%}, {method}: AUC {ours:.3f} < reference {ref:.3f}"
                )
        print()
    print(
        "ours (every head) vs reference (mean AUC over seeds):",
        "at least as good in every setting" if not worse else "",
    )
    for line in worse:
        print("  worse:", line)
    low = [
        f"{n} slides, {f:.0%}: {stats((n, f), 'ours', 4)[0]:.3f}"
        for n, f in settings
        if f >= 0.03 and stats((n, f), "ours", 4)[0] < 0.9
    ]
    print("our localisation >= 0.9 where lesions are >= 3% of the tissue:", "yes" if not low else "no")
    for line in low:
        print("  below:", line)


if __name__ == "__main__":
    main()
