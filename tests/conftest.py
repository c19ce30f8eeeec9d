"""Shared fixtures: real-tissue cohorts built by the project's own sample-data code, and small
synthetic slides with known geometry written by the project's own SVS writer."""

from __future__ import annotations

import os

# Tests never reach a model hub; without this, a hub lookup retries for about a minute first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from histotransfer.config import SampleDataConfig
from histotransfer.sample_data import build_sample_cohort
from histotransfer.svs import write_aperio_svs

# Golden slide: 0.25 um/px, levels 1x/2x/8x, one tissue rectangle aligned to the 448 px tile grid
# that 224 px tiles at 0.5 um/px make on it.
GOLDEN_MPP = 0.25
GOLDEN_SIZE = (4032, 3136)  # (width, height) level-0 px: 9 x 7 tiles of 448 px
GOLDEN_TISSUE = (896, 448, 2688, 2240)  # x0, y0, x1, y1: a 4 x 4 block of tiles
GOLDEN_TILES = [(x, y) for y in range(448, 2240, 448) for x in range(896, 2688, 448)]


def synthetic_slide_rgb(size: tuple[int, int], tissue_boxes=(), seed: int = 0) -> np.ndarray:
    """Glass-coloured canvas with H&E-coloured noisy rectangles."""
    rng = np.random.default_rng(seed)
    width, height = size
    rgb = np.full((height, width, 3), 242, dtype=np.uint8)
    for x0, y0, x1, y1 in tissue_boxes:
        noise = rng.integers(-25, 25, size=(y1 - y0, x1 - x0, 3))
        rgb[y0:y1, x0:x1] = np.clip(np.array([190, 110, 170]) + noise, 0, 255)
    return rgb


@pytest.fixture(scope="session")
def golden_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("golden") / "golden.svs"
    rgb = synthetic_slide_rgb(GOLDEN_SIZE, [GOLDEN_TISSUE])
    return write_aperio_svs(path, rgb, mpp=GOLDEN_MPP, downsamples=(2, 8))


# A small, easy sample cohort for tests that need real tissue, not a hard problem: one 20x scanner, no
# artefacts, lesions of a quarter of the tissue (the schema's defaults make the demo's harder cohort).
EASY_COHORT = dict(tissue_pieces=1, site_mpp=[0.5], lesion_fraction=0.25, artefacts=0.0)


@pytest.fixture(scope="session")
def sample_cohort(tmp_path_factory) -> Path:
    """Four small real-tissue slides at 0.5 um/px (two tumor, two normal); returns the manifest."""
    config = SampleDataConfig(n_slides=4, seed=7, **EASY_COHORT)
    return build_sample_cohort(tmp_path_factory.mktemp("cohort"), config=config)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


SMALL_STUDY = """
output_dir: {out}
sample_data: {{n_slides: 6, tissue_pieces: 1, site_mpp: [0.5], lesion_fraction: 0.25, artefacts: 0.0}}
extraction:
  encoders: [{{id: efficientnet_lite0@blocks.3}}]
mil: {{epochs: 3, folds: 3}}
evaluation: {{bootstrap: 100, heatmaps: 2}}
"""
SMALL_STUDY_ENCODER = "efficientnet_lite0@blocks.3"


@dataclass(frozen=True)
class SmallStudy:
    config: Path
    root: Path  # the study's output_dir
    run: subprocess.CompletedProcess  # `histotransfer run` as a user runs it


@pytest.fixture(scope="session")
def small_study(tmp_path_factory) -> SmallStudy:
    """`histotransfer run` (a subprocess) on six real-tissue slides with one encoder: tiles, features,
    3-fold MIL, the ONNX bundle and the report. Tests read it and may re-run it (which reuses all)."""
    folder = tmp_path_factory.mktemp("small-study")
    config = folder / "study.yaml"
    config.write_text(SMALL_STUDY.format(out=folder / "study"))
    proc = subprocess.run(
        [sys.executable, "-m", "histotransfer.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SmallStudy(config, folder / "study", proc)
