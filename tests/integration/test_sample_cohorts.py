"""A three-class sample cohort with sites at 20x and 40x and every artefact (six slides: slow)."""

import json
from collections import Counter

import numpy as np
import openslide
import pytest
from PIL import Image

from histotransfer.core.config import SampleDataConfig
from histotransfer.io.manifest import read_manifest
from histotransfer.wsi.sample_data import (
    build_sample_cohort,
)


@pytest.mark.integration
def test_three_class_cohort_with_sites_and_artefacts(tmp_path):
    config = SampleDataConfig(
        n_slides=6,
        tissue_pieces=1,
        lesion_types=["solid", "papillary"],
        positive_fraction=2 / 3,
        artefacts=1.0,
    )
    manifest = build_sample_cohort(tmp_path, config=config)
    meta = json.loads((tmp_path / "cohort.json").read_text())
    records = read_manifest(manifest)
    assert Counter(r.label for r in records) == {"normal": 2, "tumor-solid": 2, "tumor-papillary": 2}
    assert {s["mpp"] for s in meta["slides"]} == {0.5, 0.25}  # a mix of 20x and 40x scans
    assert set(meta["sources"]) == {"normal_tissue", "tumor_tissue", "papillary_tissue"}
    for record, slide_meta in zip(records, meta["slides"], strict=True):
        with openslide.OpenSlide(record.path) as slide:
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(slide_meta["mpp"])
        artefacts = np.asarray(Image.open(tmp_path / "artefacts" / f"{record.slide_id}.png")) > 0
        assert artefacts.any() == bool(slide_meta["artefacts"])
