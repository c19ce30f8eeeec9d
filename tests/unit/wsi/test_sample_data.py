import csv
import json
from collections import Counter

import numpy as np
import openslide
import pytest
from PIL import Image

from histotransfer.core.config import SampleDataConfig
from histotransfer.io.manifest import read_manifest
from histotransfer.io.provenance import sha256_file
from histotransfer.wsi.sample_data import (
    LESION_SOURCES,
    MASK_DOWNSAMPLE,
    build_sample_cohort,
    compose_slide,
    defocus,
    load_sources,
    plan_cohort,
    plan_sites,
    restain,
)


def test_cohort_is_aperio_with_resolution_and_pyramid(sample_cohort):
    records = read_manifest(sample_cohort)
    assert [r.slide_id for r in records] == [f"sample-{i:03d}" for i in range(4)]
    assert sorted(r.label for r in records) == ["normal", "normal", "tumor", "tumor"]
    for record in records:
        with openslide.OpenSlide(record.path) as slide:
            assert slide.properties["openslide.vendor"] == "aperio"
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(slide.properties["openslide.objective-power"]) == 20
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0), rel=2e-3)
            assert slide.properties["tiff.ImageDescription"].startswith("Aperio")


def test_manifest_follows_the_contract(sample_cohort):
    with sample_cohort.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "path", "label", "patient_id", "site"]
    assert all(not row["path"].startswith("/") for row in rows)  # relocatable cohort


def test_lesion_masks_match_labels_and_fraction(sample_cohort):
    meta = json.loads((sample_cohort.parent / "cohort.json").read_text())
    assert meta["mask_downsample"] == MASK_DOWNSAMPLE
    for record, slide_meta in zip(read_manifest(sample_cohort), meta["slides"], strict=True):
        mask = np.asarray(Image.open(sample_cohort.parent / "masks" / f"{record.slide_id}.png")) > 0
        with openslide.OpenSlide(record.path) as slide:
            width, height = slide.dimensions
        assert mask.shape == (-(-height // MASK_DOWNSAMPLE), -(-width // MASK_DOWNSAMPLE))
        if record.label == "tumor":
            assert slide_meta["lesion_fraction"] == pytest.approx(0.25, abs=0.02)
            assert mask.sum() > 1000
        else:
            assert not mask.any()
            assert slide_meta["lesion_fraction"] == 0.0


@pytest.mark.parametrize(
    ("params", "labels"),
    [
        ({"n_slides": 24}, {"normal": 12, "tumor": 12}),
        ({"n_slides": 10, "positive_fraction": 0.3}, {"normal": 7, "tumor": 3}),
        (
            {"n_slides": 30, "lesion_types": ["solid", "papillary"], "positive_fraction": 2 / 3},
            {"normal": 10, "tumor-solid": 10, "tumor-papillary": 10},
        ),
    ],
)
def test_plan_has_the_classes_spread_over_sites_and_lesion_sizes_in_range(params, labels):
    config = SampleDataConfig(lesion_fraction=(0.01, 0.1), sites=3, **params)
    specs = plan_cohort(config)
    assert Counter(s.label for s in specs) == labels
    assert [s.slide_id for s in specs] == [f"sample-{i:03d}" for i in range(config.n_slides)]
    for label in labels:  # each class spread evenly over the sites: site is not a proxy for the label
        per_site = Counter(s.site for s in specs if s.label == label)
        assert max(per_site.values()) - min(per_site.get(k, 0) for k in range(3)) <= 1
    fractions = [s.lesion_fraction for s in specs if s.lesion_type]
    assert all(0.01 <= f <= 0.1 for f in fractions)
    assert len(set(fractions)) == len(fractions)  # drawn, not one value
    assert all(s.lesion_fraction == 0 and s.lesion_type is None for s in specs if s.label == "normal")
    assert plan_cohort(config) == specs  # a function of the config


@pytest.mark.parametrize("per_patient", [2, 3])
def test_patients_with_several_slides_share_a_site_and_a_label(per_patient):
    specs = plan_cohort(SampleDataConfig(n_slides=24, sites=3, slides_per_patient=per_patient))
    patients: dict[str, list] = {}
    for spec in specs:
        patients.setdefault(spec.patient_id, []).append(spec)
    assert all(len({(s.site, s.label) for s in slides}) == 1 for slides in patients.values())
    assert all(len(slides) <= per_patient for slides in patients.values())
    assert sum(len(slides) == per_patient for slides in patients.values()) >= len(patients) - 6  # 3 sites x 2
    assert list(patients) == sorted(patients)  # numbered in the order of their first slides
    # one slide per patient (the default): the slide is its own patient, the plan as before
    assert {s.patient_id for s in plan_cohort(SampleDataConfig(n_slides=24))} == {""}


def test_sites_cycle_the_scanners_and_variation_zero_means_identical_sites():
    sites = plan_sites(SampleDataConfig(sites=3, site_mpp=[0.5, 0.25]))
    assert [s.mpp for s in sites] == [0.5, 0.25, 0.5]
    assert len({s.stain for s in sites}) == 3
    plain = plan_sites(SampleDataConfig(sites=3, variation=0.0))
    assert {(s.stain, s.blur_um, s.jpeg_quality) for s in plain} == {((1.0, 1.0), 0.0, 95)}


def test_artefacts_follow_their_chance():
    never = plan_cohort(SampleDataConfig(n_slides=40, artefacts=0.0))
    always = plan_cohort(SampleDataConfig(n_slides=40, artefacts=1.0))
    assert all(s.artefacts == () for s in never)
    assert all(s.artefacts == ("pen", "fold", "bubble") for s in always)
    some = plan_cohort(SampleDataConfig(n_slides=400, artefacts=0.25))
    share = np.mean([("pen" in s.artefacts) for s in some])
    assert 0.18 < share < 0.32


@pytest.mark.parametrize(
    ("value", "message"),
    [([0.2, 0.1], "needs 0 < low <= high < 1"), (0.0, "needs 0 < low"), ([0.1, 1.0], "high < 1")],
)
def test_lesion_fraction_is_a_range_or_a_point(value, message):
    assert SampleDataConfig(lesion_fraction=0.2).lesion_fraction == (0.2, 0.2)
    with pytest.raises(ValueError, match=message):
        SampleDataConfig(lesion_fraction=value)


def test_every_lesion_type_has_a_source():
    types = SampleDataConfig.model_fields["lesion_types"].annotation.__args__[0].__args__
    assert set(types) == set(LESION_SOURCES)


def test_restain_is_the_identity_at_one_and_moves_hematoxylin_and_eosin():
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    assert np.abs(restain(rgb, (1.0, 1.0)).astype(int) - rgb).max() <= 1
    tissue = np.array([[[200, 120, 170]]], dtype=np.uint8)  # pink-purple H&E
    more_h = restain(tissue, (1.5, 1.0)).astype(int)[0, 0]
    more_e = restain(tissue, (1.0, 1.5)).astype(int)[0, 0]
    assert more_h[0] < tissue[0, 0, 0]  # hematoxylin absorbs red most: redder tissue gets bluer
    assert more_e[1] < tissue[0, 0, 1]  # eosin absorbs green most
    assert (restain(tissue, (1.0, 1.0), od_gain=2.0) < tissue).all()  # a fold is darker everywhere


def test_defocus_blurs_by_its_sigma():
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[16, 16] = 255
    assert defocus(rgb, 0.2) is rgb
    spread = [int((defocus(rgb, s)[..., 0] > 0).sum()) for s in (0.6, 1.2, 2.5)]
    assert 1 < spread[0] < spread[1] < spread[2]


def test_lesion_is_painted_exactly_where_the_mask_says():
    """Same seed with and without a lesion: the slides differ inside the lesion mask and nowhere else."""
    sources = load_sources()
    kwargs = dict(mpp=0.5, tissue_pieces=1)
    plain = compose_slide(sources, np.random.default_rng(5), lesion_fraction=None, **kwargs)
    lesioned = compose_slide(sources, np.random.default_rng(5), lesion_fraction=0.3, **kwargs)
    inside = np.kron(lesioned.lesion_mask, np.ones((MASK_DOWNSAMPLE, MASK_DOWNSAMPLE), dtype=bool))
    inside = inside[: plain.rgb.shape[0], : plain.rgb.shape[1]]
    changed = (plain.rgb != lesioned.rgb).any(axis=2)
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.95
    assert lesioned.lesion_fraction == pytest.approx(0.3, abs=0.02)
    assert not plain.lesion_mask.any()
    assert plain.lesion_fraction == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_small_lesions_and_artefacts_at_20x_and_40x(mpp):
    sources = load_sources(["papillary"])
    composed = compose_slide(
        sources,
        np.random.default_rng(3),
        mpp=mpp,
        tissue_pieces=2,
        lesion_fraction=0.02,
        lesion_type="papillary",
        artefacts=("pen", "fold", "bubble"),
    )
    assert composed.lesion_fraction == pytest.approx(0.02, rel=0.15)
    assert composed.artefacts == ("fold", "pen", "bubble")
    assert composed.artefact_mask.shape == composed.lesion_mask.shape
    assert composed.artefact_mask.any()
    assert not (composed.artefact_mask & composed.lesion_mask).any()  # artefacts keep off the lesion
    assert composed.lesion_mask.shape == (
        -(-composed.rgb.shape[0] // MASK_DOWNSAMPLE),
        -(-composed.rgb.shape[1] // MASK_DOWNSAMPLE),
    )


@pytest.mark.slow
def test_deterministic_for_a_seed_and_reused(tmp_path):
    config = SampleDataConfig(n_slides=2, tissue_pieces=1, site_mpp=[0.5], seed=3)
    a = build_sample_cohort(tmp_path / "a", config=config)
    b = build_sample_cohort(tmp_path / "b", config=config)
    c = build_sample_cohort(tmp_path / "c", config=config.model_copy(update={"seed": 4}))
    digest = lambda m: [sha256_file(r.path) for r in read_manifest(m)]  # noqa: E731
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    before = (a.parent / "slides" / "sample-000.svs").stat().st_mtime_ns
    build_sample_cohort(tmp_path / "a", config=config)  # same parameters: reused, not rewritten
    assert (a.parent / "slides" / "sample-000.svs").stat().st_mtime_ns == before
