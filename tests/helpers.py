"""What several test modules share: synthetic slides with known geometry, small cohorts, the small
study's config, and a static reading of which library modules a stage can run (for DVC's deps).
Fixtures live in conftest.py and use these; test modules import from here, never from each other."""

from __future__ import annotations

import ast
import csv
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histotransfer.io import lineage
from histotransfer.io.manifest import SlideRecord
from pipelines.dvc_stages import module_file  # the path of a module of the package

# The repository's root (tests/ is one folder below it, whichever subfolder a test module is in).
REPO = Path(__file__).resolve().parents[1]

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


def tiles_summary(out: Path) -> dict[str, dict[str, str]]:
    """A tiles folder's summary.csv: its rows by slide id."""
    with (out / "summary.csv").open() as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


# A small, easy sample cohort for tests that need real tissue, not a hard problem: one 20x scanner, no
# artefacts, lesions of a quarter of the tissue (the schema's defaults make the demo's harder cohort).
EASY_COHORT = dict(tissue_pieces=1, site_mpp=[0.5], lesion_fraction=0.25, artefacts=0.0)


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
mil: {{epochs: 3, folds: 3, restarts: 1}}
evaluation: {{bootstrap: 100, heatmaps: 2}}
"""
SMALL_STUDY_ENCODER = "efficientnet_lite0@blocks.3"

# The study pipeline's tiny config (kfp.local, in .venv and under the Docker runner): the small study's
# cohort and encoder, fine-tuned
TINY = f"""
sample_data: {{n_slides: 6, tissue_pieces: 1, site_mpp: [0.5], lesion_fraction: 0.25, artefacts: 0.0}}
extraction:
  encoders: [{{id: {SMALL_STUDY_ENCODER}}}]
mil: {{epochs: 2, folds: 2, restarts: 1}}
finetune: {{encoders: [{SMALL_STUDY_ENCODER}], k: 4, epochs: 1, lr: 1.0e-4, patience: 1}}
cka: {{tiles: 32, batch_size: 16}}
evaluation: {{bootstrap: 100, heatmaps: 2}}
"""


def assert_same_features(ours: Path, theirs: Path, slides: int) -> None:
    """Two features folders of one encoder hold the same tiles' features (within float noise: thread
    counts change summation order) for the same ``slides`` slides."""
    names = sorted(p.name for p in ours.glob("*.h5"))
    assert names == sorted(p.name for p in theirs.glob("*.h5"))
    assert len(names) == slides
    for name in names:
        with h5py.File(ours / name) as a, h5py.File(theirs / name) as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
            fa, fb = a["features"][:], b["features"][:]
            np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4 * float(np.abs(fb).max()), err_msg=name)


LINEAGE_ENCODER = "resnet18@layer1+a"


@dataclass(frozen=True)
class MadeStudy:
    """A study made by the CLI on the sample cohort's four slides: tiles/, features/, mil/ (2 folds),
    onnx/best and predictions/ (one slide), with the features of ``LINEAGE_ENCODER`` from ``weights``."""

    root: Path
    manifest: Path
    weights: Path  # the weights the features were extracted with
    other: Path  # another checkpoint of the same architecture

    @property
    def mil(self) -> Path:
        return self.root / "mil" / LINEAGE_ENCODER

    @property
    def features(self) -> Path:
        return self.root / "features" / LINEAGE_ENCODER

    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    @property
    def bundle(self) -> Path:
        return self.root / "onnx" / "best"

    def copy(self, to: Path) -> MadeStudy:
        """A copy to tamper with (the slides and weights are shared, read-only)."""
        shutil.copytree(self.root, to / "study", symlinks=True)
        return MadeStudy(to / "study", self.manifest, self.weights, self.other)


BUCKET = "histotransfer-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIM = 32


def write_features(folder: Path, slide_id: str, x: np.ndarray, *, encoder_id: str, weights: str) -> Path:
    """A features file of ``slide_id`` as extraction writes one (with its lineage), of made-up features
    ``x`` (n, dim) on a row of made-up tiles; ``weights``: names the weights that made them."""
    n = len(x)
    coords = np.stack([np.arange(n) * 224, np.zeros(n)], axis=1).astype(np.int64)
    encoder = {"id": encoder_id, "weights_sha256": weights, "weights_source": "synthetic"}
    made_from = lineage.features_record(
        slide_id=slide_id,
        tiles={"digest": f"synthetic-{slide_id}", "tiling": "synthetic"},
        encoder=encoder,
        extraction="synthetic",
        features=x,
        coords=coords,
    )
    path = folder / f"{slide_id}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=x)
        f.create_dataset("coords", data=coords)
        f.attrs.update(
            {"config_hash": weights, "histotransfer_version": "synthetic", "encoder_id": encoder_id}
        )
        f.attrs[lineage.LINEAGE] = lineage.h5_attr(made_from)
    return path


def synthetic_cohort(folder, n_bags=40, seed=0, encoder_id="synthetic"):
    """Bags of N(0, 1) instances; positive bags hold 2 instances of a fixed 'tumour' vector (+ noise),
    written as features of ``encoder_id`` (with their lineage: no tiles, weights named by the seed).
    Returns (records, {slide_id: indices of planted instances}, the features folder)."""
    rng = np.random.default_rng(seed)
    planted_vector = rng.normal(0, 1, DIM) * 2.5
    records, planted = [], {}
    features_dir = folder / "features" / encoder_id
    features_dir.mkdir(parents=True)
    for i in range(n_bags):
        slide_id, label = f"bag-{i:03d}", "pos" if i % 2 else "neg"
        n = int(rng.integers(15, 40))
        x = rng.normal(0, 1, (n, DIM)).astype(np.float32)
        if label == "pos":
            where = rng.choice(n, size=2, replace=False)
            x[where] = planted_vector + rng.normal(0, 0.3, (2, DIM))
            planted[slide_id] = set(where.tolist())
        write_features(features_dir, slide_id, x, encoder_id=encoder_id, weights=f"synthetic-{seed}")
        records.append(SlideRecord(slide_id, str(folder / "x.svs"), label, patient_id=f"p{i // 2}"))
    return records, planted, features_dir


# Commands that never build an encoder import neither torch nor timm (start-up time, the slim image):
# torch and timm are made unimportable, the command must still succeed and leave them unimported.
TORCH_FREE = """
import sys
BLOCKED = {"torch", "timm", "torchvision"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from histotransfer.cli import main
rc = main(sys.argv[1:])
print("heavy modules:", sorted({m.split(".")[0] for m in sys.modules} & BLOCKED))
sys.exit(rc)
"""


def torch_free(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy modules: []" in proc.stdout
    return proc


# ---- which modules a stage runs: DVC must rerun the stage when one of them changes ------------------

PACKAGE = "histotransfer"
SRC = REPO / "src"


def _imports(node: ast.AST) -> set[str]:
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == PACKAGE:
            names = [f"{n.module}.{a.name}" for a in n.names]
            found |= {m for m in names if module_file(m)} or {n.module}  # `from pkg import module`
            found.add(n.module)
        elif isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.split(".")[0] == PACKAGE}
    return found


def _function_imports(module: str, function: str) -> set[str]:
    """Modules a function of ``module`` imports: the module's top-level imports, the function's own,
    and those of the module's functions it calls (by name, transitively)."""
    tree = ast.parse(module_file(module).read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    found = set().union(*(_imports(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)))
    todo, seen = [function], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        found |= _imports(functions[name])
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name)]
    return found


def modules_of(*entry_points: tuple[str, str]) -> set[str]:
    """Source files (``src/...py``) of every library module that the functions ``(module, name)`` can
    import, directly or through the modules they import (everything those import, at any level)."""
    start = set().union(*(_function_imports(m, f) for m, f in entry_points))
    owners = {m for m, _ in entry_points}
    seen: set[str] = set()
    todo = list(start - owners)
    while todo:
        module = todo.pop()
        if module in seen or module in owners or (path := module_file(module)) is None:
            continue
        seen.add(module)
        if module == f"{PACKAGE}.stages":  # its __init__ only re-exports the stages: a stage runs its module
            continue
        todo += _imports(ast.parse(path.read_text(encoding="utf-8")))
        todo += [module.rsplit(".", k)[0] for k in range(1, module.count("."))]  # its packages' __init__
    return {module_file(m).relative_to(SRC.parent).as_posix() for m in seen | owners if module_file(m)}
