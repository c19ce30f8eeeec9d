import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from histotransfer.core.config import EvaluationConfig, MILConfig
from histotransfer.core.encoder_ids import parse_encoder_id
from histotransfer.io.manifest import SlideRecord
from histotransfer.mil.crossval import LesionMasks, class_rocs, train_mil
from histotransfer.mil.evaluation import fast_metrics, localisation_auroc, point_metrics, with_confidence
from histotransfer.mil.results import MILResult
from histotransfer.report.html import (
    COMPARED,
    COMPARISONS_JSON,
    compared_metrics,
    family,
    write_report,
    write_tracking,
)
from tests.helpers import synthetic_cohort, write_features


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_fast_bootstrap_metrics_equal_scikit_learn(n_classes):
    rng = np.random.default_rng(n_classes)
    for _ in range(150):
        n = int(rng.integers(2, 25))
        y = rng.integers(0, n_classes, n)
        probs = rng.integers(1, 4, (n, n_classes)).astype(float)  # ties on purpose
        probs /= probs.sum(axis=1, keepdims=True)
        fast, reference = fast_metrics(y, probs), point_metrics(y, probs)
        for name, value in reference.items():
            if np.isnan(value):
                assert np.isnan(fast[name])
            else:
                assert fast[name] == pytest.approx(value, abs=1e-12), name


def test_confidence_intervals():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    probs = np.stack([1 - (p := np.clip(y * 0.3 + rng.uniform(0, 0.7, 100), 0, 1)), p], axis=1)
    out = with_confidence(y, probs, n_boot=300, ci=0.95, seed=0)
    assert out["auc"]["ci_low"] < out["auc"]["value"] < out["auc"]["ci_high"]
    tiny = with_confidence(np.array([1]), np.array([[0.2, 0.8]]), n_boot=200, ci=0.95, seed=0)
    assert tiny["auc"] == {"value": None, "ci_low": None, "ci_high": None}


def test_localisation_auroc():
    assert localisation_auroc(np.array([0.1, 0.2, 0.7]), np.array([False, False, True])) == 1.0
    assert localisation_auroc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0
    assert localisation_auroc(np.array([0.5, 0.5]), np.array([True, True])) is None


def test_lesion_labels_of_sample_cohort_tiles(sample_cohort):
    masks = LesionMasks.beside(sample_cohort)
    assert masks.downsample == 4
    mask = np.asarray(Image.open(masks.folder / "sample-000.png")) > 0
    assert mask.any()
    depth = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(depth.argmax(), mask.shape)  # deepest lesion pixel: a 64 px tile fits
    assert depth[y, x] > 10
    coords = np.array([[x * 4 - 32, y * 4 - 32], [0, 0]])  # centred in the lesion; a glass corner
    assert masks.tile_labels("sample-000", coords, 64, 0.5).tolist() == [True, False]
    assert masks.tile_labels("no-such-slide", coords, 64, 0.5) is None


@pytest.mark.parametrize(
    ("encoder_id", "kind"),
    [
        ("efficientnet_lite0", "ImageNet"),
        ("resnet50@layer3", "ImageNet · truncated"),
        ("resnet18+random", "random init"),
        ("densenet121+kimianet", "given weights (kimianet)"),
        ("resnet18@layer4+ft", "fine-tuned · truncated"),
        ("uni", "pathology foundation model"),
        ("virchow2@blocks.15", "pathology foundation model · truncated"),
        ("ctranspath", "pathology foundation model"),
        ("phikon_v2+random", "random init"),
    ],
)
def test_family(encoder_id, kind):
    assert family(parse_encoder_id(encoder_id)) == kind


@pytest.mark.slow
def test_report_has_table_truncation_curve_and_roc(tmp_path):
    results = []
    for encoder_id in ("resnet18@layer1+random", "resnet18@layer2+random", "resnet18+random"):
        records, _, features_dir = synthetic_cohort(tmp_path / encoder_id, n_bags=16, encoder_id=encoder_id)
        cfg = MILConfig(epochs=4, folds=4)
        results.append(
            train_mil(
                records,
                features_dir=features_dir,
                out_dir=tmp_path / "study" / "mil",
                mil=cfg,
                evaluation=EvaluationConfig(bootstrap=100, heatmaps=0),
            )
        )
    (tmp_path / "study" / "tiles").mkdir()
    page = write_report(
        results, report_dir=tmp_path / "study" / "report", tiles_dir=tmp_path / "study" / "tiles"
    )
    text = page.read_text()
    for encoder_id in ("resnet18@layer1+random", "resnet18@layer2+random", "resnet18+random"):
        assert f"<td>{encoder_id}</td>" in text
    assert "figures/truncation.png" in text
    assert (page.parent / "figures" / "truncation.png").stat().st_size > 1000
    assert (page.parent / "figures" / "roc.png").is_file()
    summary = (page.parent / "summary.md").read_text()
    table, compared = summary.split("## Paired comparisons")
    assert table.count("| resnet18") == 3
    assert "attention localisation AUROC" in table
    # the best against the two others: a row each, the forest plot beside the table; two slides per
    # patient here, so the units resampled are patients and the p is the bootstrap's, not DeLong's
    assert results[0].metrics["patients"]["bag-001"] == "p0"
    assert compared.count("| resnet18") == 2
    assert compared.count("| paired bootstrap |") == 2
    assert "resamples patients (8)" in compared
    assert (page.parent / "figures" / "forest.png").stat().st_size > 1000
    assert "figures/forest.png" in text
    # the table's numbers as JSON (KFP's Metrics read them), and the same numbers in DVC's metrics.json
    rows = json.loads((page.parent / COMPARISONS_JSON).read_text())["rows"]
    assert [r["other"] for r in rows] == [r.encoder_id for r in sorted(results, key=MILResult.rank_key)[1:]]
    tracked = tmp_path / "metrics.json"
    write_tracking(results, metrics=tracked, plots=None)
    table = json.loads(tracked.read_text())
    for row in rows:
        assert table[row["other"]]["auc_diff_vs_best"] == row["diff"]
        assert table[row["other"]]["p_holm_vs_best"] == row["p_holm"]
    assert compared_metrics(rows) == {r["other"]: {k: table[r["other"]][k] for k in COMPARED} for r in rows}
    # patient-level: each patient here has a negative and a positive slide, so there is no patient label
    level = results[0].metrics["patient_level"]
    assert "patients with slides of different labels (p0, p1, p2, p3, p4 and 3 more)" in level["skipped"]
    assert "auc_patient" not in table[results[0].encoder_id]
    assert "patients with slides of different labels" in summary.split("## Patient-level results")[1]


def three_class_cohort(folder, n_bags=24, seed=0):
    """Bags of N(0, 1) instances; a 'solid' or 'papillary' bag holds 3 instances of its class vector."""
    rng = np.random.default_rng(seed)
    planted = {"solid": rng.normal(0, 1, 16) * 2.5, "papillary": rng.normal(0, 1, 16) * 2.5}
    features_dir = folder / "features" / "resnet18+random"
    features_dir.mkdir(parents=True)
    records = []
    for i in range(n_bags):
        slide_id, label = f"bag-{i:03d}", ("normal", "solid", "papillary")[i % 3]
        x = rng.normal(0, 1, (30, 16)).astype(np.float32)
        if label != "normal":
            x[:3] = planted[label] + rng.normal(0, 0.3, (3, 16))
        write_features(features_dir, slide_id, x, encoder_id="resnet18+random", weights=f"seed-{seed}")
        records.append(SlideRecord(slide_id, str(folder / "x.svs"), label, patient_id=slide_id))
    return records, features_dir


@pytest.mark.slow
def test_three_classes_get_one_vs_rest_metrics_and_curves(tmp_path):
    records, features_dir = three_class_cohort(tmp_path)
    result = train_mil(
        records,
        features_dir=features_dir,
        out_dir=tmp_path / "study" / "mil",
        mil=MILConfig(epochs=10, folds=3),
        evaluation=EvaluationConfig(bootstrap=100, heatmaps=0),
    )
    assert result.metrics["classes"] == ["normal", "papillary", "solid"]
    y, probs, _ = result.oof_predictions()
    assert probs.shape == (24, 3)
    expected = np.mean([roc_auc_score(y == k, probs[:, k]) for k in range(3)])
    assert result.metrics["pooled"]["auc"]["value"] == pytest.approx(expected)  # macro one-vs-rest
    assert result.metrics["pooled"]["auc"]["value"] > 0.9
    assert set(class_rocs(y, probs, result.metrics["classes"])) == {"normal", "papillary", "solid"}
    (tmp_path / "study" / "tiles").mkdir()
    page = write_report(
        [result], report_dir=tmp_path / "study" / "report", tiles_dir=tmp_path / "study" / "tiles"
    )
    text = page.read_text()
    assert "3 classes: AUC is the mean one-vs-rest AUC, F1 the macro F1" in text
    assert (page.parent / "figures" / "roc.png").stat().st_size > 1000  # the per-class curves
    assert (result.out_dir / "roc.png").is_file()


def test_seed_repeats_are_summarised_and_reported(tmp_path):
    records, _, features_dir = synthetic_cohort(tmp_path, n_bags=16)
    result = train_mil(
        records,
        features_dir=features_dir,
        out_dir=tmp_path / "study" / "mil",
        mil=MILConfig(epochs=4, folds=4, seeds=3, seed=5, restarts=1),
        evaluation=EvaluationConfig(bootstrap=100, heatmaps=0),
    )
    seeds = result.metrics["seeds"]
    assert seeds["n"] == 3
    assert [row["seed"] for row in seeds["per_seed"]] == [5, 6, 7]
    assert seeds["per_seed"][0]["auc"] == pytest.approx(result.metrics["pooled"]["auc"]["value"])
    aucs = [row["auc"] for row in seeds["per_seed"]]
    assert seeds["mean"]["auc"] == pytest.approx(np.mean(aucs))
    assert seeds["sd"]["auc"] == pytest.approx(np.std(aucs, ddof=1))
    (tmp_path / "study" / "tiles").mkdir()
    page = write_report(
        [result], report_dir=tmp_path / "study" / "report", tiles_dir=tmp_path / "study" / "tiles"
    )
    assert f"{seeds['mean']['auc']:.3f} ± {seeds['sd']['auc']:.3f} (n=3)" in page.read_text()
    one = train_mil(
        records,
        features_dir=features_dir,
        out_dir=tmp_path / "one" / "mil",
        mil=MILConfig(epochs=4, folds=4, restarts=1),
        evaluation=EvaluationConfig(bootstrap=100, heatmaps=0),
    )
    assert one.metrics["seeds"]["n"] == 1
    assert one.metrics["seeds"]["sd"]["auc"] is None
