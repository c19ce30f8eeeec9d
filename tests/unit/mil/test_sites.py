"""Site-held-out evaluation (evaluation.cv: site): the folds, what MIL records, and the report's verdict."""

import dataclasses
import json

import numpy as np
import pytest

from histotransfer.core.config import EvaluationConfig, MILConfig
from histotransfer.io.manifest import SlideRecord, read_manifest
from histotransfer.mil.crossval import train_mil
from histotransfer.mil.results import classification_summary
from histotransfer.mil.splits import SplitError, site_folds
from histotransfer.report.html import site_flags, write_report, write_tracking
from tests.helpers import DIM, write_csv, write_features


def records(
    sites: list[str | None], labels: list[str], patients: list[str] | None = None
) -> list[SlideRecord]:
    patients = patients or [f"p{i}" for i in range(len(sites))]
    return [
        SlideRecord(f"s{i}", "x.svs", label, patient, line=i + 2, site=site)
        for i, (site, label, patient) in enumerate(zip(sites, labels, patients, strict=True))
    ]


def test_each_fold_tests_one_site_and_trains_on_the_others():
    sites = ["b", "a", "c"] * 8
    labels = ["x", "y"] * 12
    cohort = records(sites, labels)
    folds = site_folds(cohort, val_fraction=0.25, seed=0)
    site_of = {r.slide_id: r.site for r in cohort}
    assert list(folds) == ["a", "b", "c"]  # by name
    assert [f.index for f in folds.values()] == [0, 1, 2]
    for site, fold in folds.items():
        assert {site_of[i] for i in fold.test} == {site}
        assert site not in {site_of[i] for i in fold.train + fold.val}
        assert sorted(fold.train + fold.val + fold.test) == sorted(site_of)
        assert fold.val  # a validation part from the other sites' patients
    assert site_folds(cohort, val_fraction=0, seed=0)["a"].val == ()


@pytest.mark.parametrize(
    ("sites", "labels", "patients", "said"),
    [
        (["a", None, "b", ""], ["x", "y", "x", "y"], None, "empty or missing for s1 (line 3), s3 (line 5)"),
        (["a"] * 4, ["x", "y", "x", "y"], None, "every slide is from 'a'"),
        (
            ["a", "b", "a", "b"],
            ["x", "y", "x", "y"],
            ["p0", "p0", "p1", "p2"],
            "more than one site: p0 (a, b)",
        ),
        # site b holds every y: holding it out leaves no y to train on (site a is held out first: x)
        (["a", "b", "a", "b"], ["x", "y", "x", "y"], None, "class 'x' has no slide in the training part"),
    ],
)
def test_what_site_folds_cannot_be_made_from_is_named(sites, labels, patients, said):
    with pytest.raises(SplitError, match=r"evaluation\.cv: patient") as info:
        site_folds(records(sites, labels, patients), val_fraction=0, seed=0)
    assert said in str(info.value)


def test_a_manifest_split_is_not_combined_with_site_folds():
    cohort = [
        dataclasses.replace(r, split="test" if r.site == "a" else "train")
        for r in records(["a", "b"] * 4, ["x", "y"] * 4)
    ]
    with pytest.raises(SplitError, match=r"split column fixes one train/test split \(line 2: test\)"):
        site_folds(cohort, val_fraction=0, seed=0)


def test_run_refuses_a_cohort_without_sites_before_the_first_slide():
    from histotransfer.core.config import StudyConfig
    from histotransfer.stages.run import check_cohort

    cohort = records([None] * 8, ["x", "y"] * 4)
    check_cohort(StudyConfig(mil={"folds": 2}), cohort)  # patient folds need no site
    with pytest.raises(SplitError, match=r"empty or missing for s0 \(line 2\)"):
        check_cohort(StudyConfig(mil={"folds": 2}, evaluation={"cv": "site"}), cohort)


def test_the_manifest_site_column_is_read_and_kept_by_the_cohort_copy(tmp_path):
    from histotransfer.stages.cohort import _row

    rows = [
        {"slide_id": "a", "path": "a.svs", "label": "x", "site": " s1 "},
        {"slide_id": "b", "path": "b.svs", "label": "y"},
    ]
    for row in rows:
        (tmp_path / row["path"]).write_bytes(b"")
    parsed = read_manifest(write_csv(tmp_path / "m.csv", rows))
    assert [r.site for r in parsed] == ["s1", None]
    assert _row(parsed[0])["site"] == "s1"


SITES = "abcdef"


def confounded_cohort(folder, n_per_site=8, seed=0):
    """Six sites whose slides carry their site's signature in every tile, and no tissue signal at all
    (features of a network that sees only stain); the label goes with the site (a, c, e: 7 of 8
    positive; b, d, f: 1 of 8). Site-mixed folds reward recognising the site; held out, that is worth
    nothing."""
    rng = np.random.default_rng(seed)
    signature = {s: rng.normal(0, 1, DIM) * 3 for s in SITES}
    features = folder / "features" / "synthetic"
    features.mkdir(parents=True)
    out = []
    for n, s in enumerate(SITES):
        n_pos = n_per_site - 1 if n % 2 == 0 else 1
        for i in range(n_per_site):
            slide_id, label = f"{s}{i:02d}", "pos" if i < n_pos else "neg"
            x = rng.normal(0, 1, (20, DIM)).astype(np.float32) + signature[s]
            write_features(features, slide_id, x.astype(np.float32), encoder_id="synthetic", weights="w")
            out.append(SlideRecord(slide_id, "x.svs", label, patient_id=slide_id, site=s))
    return out, features


@pytest.mark.slow
def test_a_site_confounded_encoder_loses_its_auc_out_of_site_and_the_report_says_so(tmp_path, monkeypatch):
    import histotransfer.mil.crossval as crossval

    trained_on = []
    real = crossval.train_fold
    monkeypatch.setattr(
        crossval, "train_fold", lambda store, fold, **kw: trained_on.append(fold) or real(store, fold, **kw)
    )
    cohort, features = confounded_cohort(tmp_path)
    mil = MILConfig(epochs=10, folds=3, restarts=1)
    evaluation = EvaluationConfig(bootstrap=200, heatmaps=0, cv="site")
    result = train_mil(
        cohort, features_dir=features, out_dir=tmp_path / "mil", mil=mil, evaluation=evaluation
    )
    sites = result.metrics["sites"]
    assert [f["site"] for f in sites["folds"]] == list(SITES)
    assert [f["fold"] for f in sites["folds"]] == list(range(6))
    # the held-out folds: no model saw a slide of the site it predicts
    site_of = {r.slide_id: r.site for r in cohort}
    held_out = trained_on[3:]
    assert len(held_out) == 6
    for fold, site in zip(held_out, SITES, strict=True):
        assert {site_of[i] for i in fold.test} == {site}
        assert site not in {site_of[i] for i in fold.train + fold.val}
    auc_in, auc_out = result.metrics["pooled"]["auc"]["value"], sites["out_of_site"]["auc"]["value"]
    assert auc_in > 0.7, auc_in  # the site predicts the label in site-mixed folds (at best 0.875 here)
    assert auc_in - auc_out > 0.2, (auc_in, auc_out)  # held out, recognising it is worth little
    print(f"site-confounded: AUC {auc_in:.3f} in site-mixed folds, {auc_out:.3f} held out")
    assert set(sites["per_site"]) == set(SITES)
    assert all(v["n_slides"] == 8 for v in sites["per_site"].values())
    # the out-of-site predictions are kept, each slide's from the fold of its own site; the per-site AUCs
    # are those of these predictions and of the site-mixed ones (a plain scikit-learn loop)
    import csv

    from sklearn.metrics import roc_auc_score

    with (result.out_dir / "predictions_by_site.csv").open() as f:
        held = list(csv.DictReader(f))
    with (result.out_dir / "predictions.csv").open() as f:
        mixed = list(csv.DictReader(f))
    assert all(int(row["fold"]) == SITES.index(site_of[row["slide_id"]]) for row in held)
    for site in SITES:
        for rows, key in ((held, "auc_out"), (mixed, "auc_in")):
            mine = [row for row in rows if site_of[row["slide_id"]] == site]
            y = [row["label"] == "pos" for row in mine]
            expected = roc_auc_score(y, [float(row["prob_pos"]) for row in mine])
            assert sites["per_site"][site][key] == pytest.approx(expected, abs=1e-5), (site, key)
    assert "predictions_by_site.csv" in result.metrics["lineage"]["files"]
    # the same result resumes
    again = train_mil(cohort, features_dir=features, out_dir=tmp_path / "mil", mil=mil, evaluation=evaluation)
    assert again.reused
    # trackers: KFP's Metrics and DVC's metrics.json carry the held-out AUC
    assert classification_summary(result.out_dir)["metrics"]["auc_out_of_site"] == auc_out
    write_tracking([result], metrics=tmp_path / "metrics.json", plots=None)
    assert json.loads((tmp_path / "metrics.json").read_text())["synthetic"]["auc_out_of_site"] == auc_out
    (tmp_path / "tiles").mkdir()
    page = write_report([result], report_dir=tmp_path / "report", tiles_dir=tmp_path / "tiles")
    summary = (page.parent / "summary.md").read_text()
    assert "## Out-of-site evaluation" in summary
    assert f"| synthetic | {auc_in:.3f} | {auc_out:.3f} [" in summary
    assert (page.parent / "figures" / "sites.png").stat().st_size > 1000


def test_patient_folds_alone_keep_the_resume_key_results_had_before_site_evaluation(tmp_path):
    from histotransfer.mil.crossval import _stage_config

    cohort = records(["a", "b"], ["x", "y"])
    made = _stage_config(cohort, {}, MILConfig(), EvaluationConfig())
    assert "cv" not in made["evaluation"]
    assert "sites" not in made
    made = _stage_config(cohort, {}, MILConfig(), EvaluationConfig(cv="site"))
    assert made["evaluation"]["cv"] == "site"
    assert made["sites"] == [("s0", "a"), ("s1", "b")]


def test_an_advantage_that_disappears_out_of_site_is_flagged():
    rows = [("imagenet", 0.95, 0.93), ("random", 0.97, 0.60), ("kimianet", 0.90, 0.91)]
    flags = site_flags(rows)
    assert flags == [
        "random's advantage over imagenet disappears out of site: 0.970 vs 0.950 in site-mixed folds, "
        "0.600 vs 0.930 with the test site held out (not tested for significance)",
        "random's advantage over kimianet disappears out of site: 0.970 vs 0.900 in site-mixed folds, "
        "0.600 vs 0.910 with the test site held out (not tested for significance)",
    ]
    # imagenet keeps its lead over kimianet out of site; a lead under 0.02 is no advantage to lose
    assert site_flags([("a", 0.91, 0.80), ("b", 0.90, 0.85)]) == []
    assert site_flags([]) == []


def test_a_fine_tuned_encoders_result_is_not_evaluated_out_of_site(tmp_path):
    """Fine-tuned features come with the folds their encoders were fine-tuned in (here one folder, as a
    manifest split gives): those encoders were trained on every site's slides, so no held-out fold is
    trained and the result says why."""
    from histotransfer.mil.splits import make_folds
    from tests.helpers import synthetic_cohort

    cohort, _, features = synthetic_cohort(tmp_path, n_bags=12)
    cohort = [dataclasses.replace(r, site="ab"[i % 2]) for i, r in enumerate(cohort)]
    folds = make_folds(cohort, n_folds=2, val_fraction=0, seed=0)
    result = train_mil(
        cohort,
        features_dir=features,
        out_dir=tmp_path / "mil",
        mil=MILConfig(epochs=1, folds=2, restarts=1),
        evaluation=EvaluationConfig(bootstrap=100, heatmaps=0, cv="site"),
        folds=folds,
    )
    assert "fine-tuned in that fold" in result.metrics["sites"]["skipped"]
    assert not (result.out_dir / "predictions_by_site.csv").exists()
