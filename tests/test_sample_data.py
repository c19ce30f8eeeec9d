import csv
import json

import numpy as np
import openslide
import pytest
from PIL import Image

from histotransfer.config import SampleDataConfig
from histotransfer.manifest import read_manifest
from histotransfer.provenance import sha256_file
from histotransfer.sample_data import MASK_DOWNSAMPLE, build_sample_cohort, compose_slide, load_sources


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
    assert list(rows[0]) == ["slide_id", "path", "label", "patient_id"]
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


def test_deterministic_for_a_seed_and_reused(tmp_path):
    config = SampleDataConfig(n_slides=2, tissue_pieces=1, seed=3)
    a = build_sample_cohort(tmp_path / "a", config=config)
    b = build_sample_cohort(tmp_path / "b", config=config)
    c = build_sample_cohort(tmp_path / "c", config=config.model_copy(update={"seed": 4}))
    digest = lambda m: [sha256_file(r.path) for r in read_manifest(m)]  # noqa: E731
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    before = (a.parent / "slides" / "sample-000.svs").stat().st_mtime_ns
    build_sample_cohort(tmp_path / "a", config=config)  # same parameters: reused, not rewritten
    assert (a.parent / "slides" / "sample-000.svs").stat().st_mtime_ns == before
