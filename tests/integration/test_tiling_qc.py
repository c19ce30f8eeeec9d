"""Tiling QC against ground truth: slides of the sample cohort with a pen mark, a fold and a bubble each."""

import numpy as np
import pytest
from PIL import Image

from histotransfer.core.config import SampleDataConfig, TilingConfig
from histotransfer.io.manifest import read_manifest
from histotransfer.wsi.geometry import tissue_fractions
from histotransfer.wsi.sample_data import MASK_DOWNSAMPLE, build_sample_cohort
from histotransfer.wsi.tiling import load_tiles, tile_cohort
from tests.helpers import tiles_summary


@pytest.mark.integration
def test_qc_drops_artefact_tiles_and_keeps_clean_tissue(tmp_path):
    """Slides of the sample cohort with a pen mark, a fold and a bubble each: against their ground-truth
    artefact masks, QC keeps few tiles that are mostly artefact and drops almost no clean tile."""
    config = SampleDataConfig(n_slides=3, tissue_pieces=2, site_mpp=[0.5], artefacts=1.0, seed=2)
    records = read_manifest(build_sample_cohort(tmp_path / "cohort", config=config))
    plain = TilingConfig(max_od_ratio=None, max_saturation_ratio=None, tissue={"pen_hue_deg": None})
    tile_cohort(records, out_dir=tmp_path / "qc", tiling=TilingConfig())
    tile_cohort(records, out_dir=tmp_path / "plain", tiling=plain)
    counts = {"qc": np.zeros(2, int), "plain": np.zeros(2, int)}  # (artefact tiles, clean tiles)
    for record in records:
        truth = np.asarray(Image.open(tmp_path / "cohort" / "artefacts" / f"{record.slide_id}.png")) > 0
        for run in counts:
            tiles = load_tiles(tmp_path / run / f"{record.slide_id}.h5")
            covered = tissue_fractions(
                truth,
                mask_downsample=(MASK_DOWNSAMPLE, MASK_DOWNSAMPLE),
                coords_lv0=tiles.coords,
                patch_size_lv0=tiles.patch_size_level0,
            )
            counts[run] += [(covered > 0.5).sum(), (covered == 0).sum()]
    assert counts["plain"][0] >= 10  # the artefacts do land on tissue tiles
    assert counts["qc"][0] <= 0.5 * counts["plain"][0]
    assert counts["qc"][1] >= 0.98 * counts["plain"][1]
    summary = tiles_summary(tmp_path / "qc")
    assert sum(float(row["ink_fraction"]) for row in summary.values()) > 0
    assert sum(int(row["qc_dropped_tiles"]) for row in summary.values()) > 0
