"""Lineage: every artifact records what it was made from, every consumer checks it, and `histotransfer
verify` walks the chain. Each test tampers with a real study (tiles, features, MIL, a bundle and
predictions made by the CLI on real tissue) in a way no check was written for by name, and expects the
mismatch to be refused (exit 2) or reported (exit 1), naming both sides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histotransfer.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_SLIDES_FAILED, main
from histotransfer.deploy.bundle import BundleError, read_spec
from histotransfer.io import lineage
from histotransfer.io.manifest import read_manifest
from tests.helpers import LINEAGE_ENCODER as ENCODER
from tests.helpers import MadeStudy, write_csv

pytestmark = pytest.mark.integration


@pytest.fixture
def study(made_study) -> MadeStudy:
    return made_study


def _manifest(folder: Path, study: MadeStudy, **paths: str) -> Path:
    """The study's manifest with some slides' paths replaced (slide id -> path)."""
    rows = [
        {"slide_id": r.slide_id, "path": paths.get(r.slide_id, r.path), "label": r.label}
        for r in read_manifest(study.manifest)
    ]
    return write_csv(folder / "m.csv", rows)


def _extract(study: MadeStudy, manifest: Path, *extra: str) -> int:
    argv = ["extract", str(manifest), "--tiles", str(study.root / "tiles"), "--encoder", ENCODER]
    return main([*argv, "--weights", str(study.weights), "--out", str(study.root / "features"), *extra])


# -------------------------------------------------------------------------------- a clean study verifies


def test_every_artifact_records_its_lineage_and_the_study_verifies(study, capsys):
    slide_id = read_manifest(study.manifest)[0].slide_id
    tiles = lineage.read_record(study.root / "tiles" / f"{slide_id}.h5", "tiles")
    features = lineage.read_record(study.features / f"{slide_id}.h5", "features")
    assert tiles["slide"]["quickhash"]
    assert tiles["slide"]["size"] > 0
    assert features["tiles"]["digest"] == tiles["digest"]
    assert features["encoder"]["weights_source"].startswith("file:a.pth")
    mil = json.loads((study.mil / "metrics.json").read_text())["lineage"]
    assert mil["encoder"]["*"]["weights_sha256"] == features["encoder"]["weights_sha256"]
    written = {f"fold{k}/{name}" for k in (0, 1) for name in ("model.pt", "history.json")}
    assert set(mil["files"]) == written | {"predictions.csv"}
    assert read_spec(study.root / "onnx" / "best").lineage["mil"]["head"] in mil["files"].values()
    assert main(["verify", str(study.root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "4 artifact(s), all match" in out, out
    for artifact in ("tiles/", f"features/{ENCODER}/", f"mil/{ENCODER}/", "onnx/best/"):
        assert f"ok        {artifact}" in out
    assert main(["verify", str(study.root / "predictions")]) == EXIT_OK


# ------------------------------------------------------------------------ consumers refuse a mismatch


def test_tiles_files_swapped_between_slides_are_refused(study, tmp_path, capsys):
    s = study.copy(tmp_path)
    a, b = (r.slide_id for r in read_manifest(s.manifest)[:2])
    tiles = s.root / "tiles"
    (tiles / f"{a}.h5").rename(tiles / "x.h5")
    (tiles / f"{b}.h5").rename(tiles / f"{a}.h5")
    (tiles / "x.h5").rename(tiles / f"{b}.h5")
    before = sorted(p.stat().st_mtime_ns for p in s.features.glob("*.h5"))
    assert _extract(s, s.manifest, "--overwrite") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{a}.h5 holds the tiles of slide '{b}', not of '{a}'" in err
    assert "tile" in err.splitlines()[-1] or "restore the name" in err
    assert sorted(p.stat().st_mtime_ns for p in s.features.glob("*.h5")) == before  # nothing redone
    assert main(["verify", str(s.root)]) == EXIT_SLIDES_FAILED


def test_a_manifest_row_naming_another_file_is_refused_and_a_moved_slide_is_not(study, tmp_path, capsys):
    records = read_manifest(study.manifest)
    first, last = records[0], records[-1]
    others = {r.slide_id: r.path for r in records if r.slide_id != last.slide_id}
    rows = [{"slide_id": i, "path": p, "label": "x"} for i, p in others.items()]
    rows[0]["path"], rows[1]["label"] = last.path, "y"  # the first id now names the last slide's file
    manifest = write_csv(tmp_path / "m.csv", rows)
    assert _extract(study, manifest) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert (
        f"{first.slide_id}: its tiles were made from {first.path}, but the manifest lists {last.path}" in err
    )
    moved = tmp_path / "moved" / "slide.svs"
    moved.parent.mkdir()
    shutil.copy(first.path, moved)
    assert _extract(study, _manifest(tmp_path / "moved", study, **{first.slide_id: str(moved)})) == EXIT_OK


def test_a_slide_changed_after_tiling_fails_alone_with_the_reason(study, tmp_path, capsys):
    records = read_manifest(study.manifest)
    changed = tmp_path / "changed.svs"
    shutil.copy(records[1].path, changed)  # another slide under the first one's id...
    s = study.copy(tmp_path)
    with h5py.File(s.root / "tiles" / f"{records[0].slide_id}.h5", "a") as f:  # ...at the tiled path
        made = json.loads(f.attrs["lineage"])
        made["slide"]["path"] = str(changed)
        f.attrs["lineage"] = lineage.h5_attr(made)  # sealed again: a consistent record, of another thing
    manifest = _manifest(tmp_path, s, **{records[0].slide_id: str(changed)})
    assert _extract(s, manifest, "--overwrite") == EXIT_SLIDES_FAILED
    err = capsys.readouterr().err
    assert f"{records[0].slide_id}: LineageError: {changed} is not the slide" in err
    assert "the file changed since tiling; tile it again with --overwrite" in err
    assert "1 of 4 slide(s) failed" in err


def test_features_of_another_encoder_or_of_other_tiles_are_refused_by_train(study, tmp_path, capsys):
    s = study.copy(tmp_path)
    slide_ids = [r.slide_id for r in read_manifest(s.manifest)]
    train = ["train", str(s.manifest), "--tiles", str(s.root / "tiles"), "--out", str(tmp_path / "mil")]
    stranger = s.root / "features" / "resnet18@layer1+b"
    shutil.copytree(s.features, stranger)
    with h5py.File(stranger / f"{slide_ids[0]}.h5", "a") as f:  # a file of another encoder, moved in
        made = json.loads(f.attrs["lineage"])
        made["encoder"] |= {"id": "resnet34", "weights_sha256": "0" * 64}
        f.attrs["lineage"] = lineage.h5_attr(made)  # sealed again: a consistent record, of another thing
    assert main([*train, "--features", str(stranger)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert (
        f"{slide_ids[0]}.h5 was made by encoder resnet34, but lies in the folder of resnet18@layer1+b" in err
    )
    assert "mixes features of different weights or settings" in err
    assert f"1 slide(s) ({slide_ids[0]}) with weights 000000000000..." in err
    assert (
        main(["tile", str(s.manifest), "--out", str(s.root / "tiles"), "--overwrite", "--patch-size", "192"])
        == 0
    )
    assert main([*train, "--features", str(s.features)]) == EXIT_BAD_INPUT
    assert "was extracted from other tiles than the study's" in capsys.readouterr().err
    assert _extract(s, s.manifest) == EXIT_OK  # resume sees the tiles changed: extracted again
    assert main([*train, "--features", str(s.features), "--folds", "2", "--epochs", "1"]) == EXIT_OK


def test_export_refuses_other_weights_a_changed_head_and_other_tiles(study, tmp_path, capsys):
    export = ["export", "--mil", str(study.mil), "--out", str(tmp_path / "b")]
    assert main([*export, "--weights", str(study.other)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "was made from the weights file:a.pth" in err
    assert "the weights given are file:b.pth" in err
    s = study.copy(tmp_path)
    head = s.mil / "fold1" / "model.pt"
    torch.save({k: v + 1 for k, v in torch.load(head, weights_only=True).items()}, head)
    s_export = ["export", "--mil", str(s.mil), "--weights", str(s.weights), "--out", str(tmp_path / "c")]
    assert main([*s_export, "--fold", "1"]) == EXIT_BAD_INPUT
    assert f"{head} changed after the MIL result" in capsys.readouterr().err
    assert main([*s_export, "--fold", "0"]) == EXIT_OK  # the other fold's head is untouched
    other_tiles = tmp_path / "t2"
    assert main(["tile", str(s.manifest), "--out", str(other_tiles), "--patch-size", "192"]) == 0
    assert main([*s_export, "--fold", "0", "--tiles", str(other_tiles), "--overwrite"]) == EXIT_BAD_INPUT
    assert "tiles made with other tiling settings" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(classes=d["classes"][::-1]),
        lambda d: d["tiling"].update(target_mpp=1.0),
        lambda d: d["encoder"].update(mean=[0.0, 0.0, 0.0]),
        lambda d: d["parity"]["encoder"].update(max_rel=0.0),
        lambda d: d.update(name="renamed"),
    ],
    ids=["classes", "tiling", "normalisation", "parity", "name"],
)
def test_any_edit_of_bundle_json_is_refused(tiny_bundle, tmp_path, edit):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    data = json.loads((bundle / "bundle.json").read_text())
    edit(data)
    (bundle / "bundle.json").write_text(json.dumps(data, indent=4))
    with pytest.raises(BundleError, match="was changed after export"):
        read_spec(bundle)


# --------------------------------------------------------------------------- verify names what changed


def _swap_features(s: MadeStudy, slide_id: str) -> None:
    """Another slide's features under this slide's name."""
    other = next(p for p in sorted(s.features.glob("*.h5")) if p.stem != slide_id)
    shutil.copy(other, s.features / f"{slide_id}.h5")


def _swap_bundle_head(s: MadeStudy) -> None:
    """The other fold's head in place of the one the bundle was exported with (fold 0 here)."""
    assert read_spec(s.root / "onnx" / "best").aggregator.fold == 0
    shutil.copy(s.mil / "fold1" / "model.pt", s.mil / "fold0" / "model.pt")


def _edit_attr(path: Path, dataset: str, name: str, value) -> None:
    with h5py.File(path, "a") as f:
        f[dataset].attrs[name] = value


def _edit_metrics(path: Path) -> None:
    """The classes swapped, as valid JSON: every prediction of an export would be flipped."""
    data = json.loads(path.read_text())
    data["classes"] = data["classes"][::-1]
    path.write_text(json.dumps(data))


def _edit_h5(path: Path, dataset: str) -> None:
    with h5py.File(path, "a") as f:
        f[dataset][0] = f[dataset][0] + 1


@pytest.mark.parametrize(
    ("tamper", "artifact", "said"),
    [
        (lambda s, i: _edit_h5(s.root / "tiles" / f"{i}.h5", "coords"), "tiles/", "was changed after tiling"),
        (lambda s, i: _edit_h5(s.features / f"{i}.h5", "features"), f"features/{ENCODER}/",
         "changed after extraction"),
        (lambda s, i: (s.mil / "predictions.csv").write_text((s.mil / "predictions.csv").read_text() + "\n"),
         f"mil/{ENCODER}/", "predictions.csv was changed after training"),
        (lambda s, i: _swap_bundle_head(s), "onnx/best/", "its MIL result: fold0/model.pt was changed after"),
        (lambda s, i: _swap_features(s, i), f"features/{ENCODER}/", "holds the features of slide"),
        (lambda s, i: (s.root / "tiles" / f"{i}.h5").rename(s.root / "tiles" / "other.h5"), "tiles/",
         "other.h5 holds the tiles of slide"),
        (lambda s, i: _edit_attr(s.root / "tiles" / f"{i}.h5", "coords", "patch_size", 112), "tiles/",
         "was changed after tiling (its coordinates or geometry"),
        (lambda s, i: _edit_metrics(s.mil / "metrics.json"), f"mil/{ENCODER}/",
         "metrics.json was changed after histotransfer wrote it"),
    ],
    ids=["tiles", "features", "mil", "bundle-head", "features-swapped", "tiles-renamed", "tiles-geometry",
         "metrics-json"],
)  # fmt: skip
def test_verify_names_each_kind_of_tampering(study, tmp_path, capsys, tamper, artifact, said):
    s = study.copy(tmp_path)
    slide_id = read_manifest(s.manifest)[1].slide_id
    tamper(s, slide_id)
    assert main(["verify", str(s.root)]) == EXIT_SLIDES_FAILED
    out = capsys.readouterr().out
    block = out.split(f"MISMATCH  {artifact}", 1)
    assert len(block) == 2, out
    assert said in block[1].split("\n  ok", 1)[0], out
    assert "redo: " in block[1]


def test_verify_predictions_against_a_bundle_exported_again(study, tmp_path, capsys):
    s = study.copy(tmp_path)
    bundle = s.root / "onnx" / "best"
    predictions = s.root / "predictions"
    for path in (predictions / "slides").glob("*.h5"):  # predicted with the study's bundle, at its path
        with h5py.File(path, "a") as f:
            made = json.loads(f.attrs["lineage"])
            made["bundle"]["path"] = str(bundle)
            f.attrs["lineage"] = lineage.h5_attr(made)  # sealed again: a consistent record, of another thing
    assert main(["verify", str(predictions)]) == EXIT_OK
    export = ["export", "--mil", str(s.mil), "--weights", str(s.weights), "--fold", "1", "--out", str(bundle)]
    assert main([*export, "--overwrite"]) == EXIT_OK
    capsys.readouterr()
    assert main(["verify", str(predictions)]) == EXIT_SLIDES_FAILED
    assert "predicted by another export of" in capsys.readouterr().out


def test_features_digest_is_of_the_content_not_the_file(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    coords = np.zeros((3, 2), dtype=np.int64)
    assert lineage.array_digest(x, coords) == lineage.array_digest(x.copy(order="F"), coords)
    assert lineage.array_digest(x, coords) != lineage.array_digest(x.astype(np.float64), coords)
    assert lineage.array_digest(x, coords) != lineage.array_digest(x.reshape(4, 3), coords)


def test_a_slide_replaced_at_its_path_is_done_again_by_a_plain_rerun(study, tmp_path):
    """Resume follows content: the replaced slide is tiled again (its fingerprint is part of the tiles'
    resume key), its features are extracted again (the tiles' digest is part of theirs); the others are
    reused."""
    s = study.copy(tmp_path)
    records = read_manifest(s.manifest)
    slides = {r.slide_id: tmp_path / f"{r.slide_id}.svs" for r in records}
    for r in records:
        shutil.copy(r.path, slides[r.slide_id])
    manifest = write_csv(
        tmp_path / "m.csv",
        [{"slide_id": r.slide_id, "path": str(slides[r.slide_id]), "label": r.label} for r in records],
    )
    tiles = ["tile", str(manifest), "--out", str(s.tiles)]
    assert main([*tiles, "--overwrite"]) == EXIT_OK  # tiles of the copies
    assert _extract(s, manifest) == EXIT_OK

    def stamps() -> dict[str, int]:
        return {f"{p.parent.name}/{p.name}": p.stat().st_mtime_ns for p in s.root.glob("[tf]*/**/*.h5")}

    before = stamps()
    first, second = records[0].slide_id, records[1].slide_id
    shutil.copy(slides[second], slides[first])  # another slide now lies at the first one's path
    assert main(tiles) == EXIT_OK
    assert _extract(s, manifest) == EXIT_OK
    now = stamps()
    redone = sorted(name for name in now if now[name] != before[name])
    assert redone == [f"{ENCODER}/{first}.h5", f"tiles/{first}.h5"]  # its tiles and features, no more
    assert (
        lineage.read_record(s.tiles / f"{first}.h5", "tiles")["slide"]["quickhash"]
        == (lineage.read_record(s.tiles / f"{second}.h5", "tiles")["slide"]["quickhash"])
    )


def test_verify_compares_prediction_files_with_their_table(study, tmp_path, capsys):
    s = study.copy(tmp_path)
    predictions = s.root / "predictions"
    (slide,) = (predictions / "slides").glob("*.h5")
    with h5py.File(slide, "a") as f:  # the probabilities swapped: the table no longer agrees either
        f["probabilities"][...] = f["probabilities"][:][::-1]
    assert main(["verify", str(predictions)]) == EXIT_SLIDES_FAILED
    assert f"slides/{slide.name} was changed after it was predicted" in capsys.readouterr().out


def test_fine_tuned_features_and_folds_are_tied_to_their_fine_tuning(study, tmp_path, capsys):
    """A fine-tuned fold's features are of that fold's encoder: swapped fold folders, or features kept
    from a fine-tuning that was redone, are named by verify (and redone by a rerun)."""
    s = study.copy(tmp_path)
    tune = [
        "finetune",
        str(s.manifest),
        "--study",
        str(s.root),
        "--encoder",
        ENCODER,
        "--weights",
        str(s.weights),
    ]
    mil = ["--set", "mil={folds: 2, epochs: 1, restarts: 1}", "--set", "evaluation.bootstrap=100"]
    assert main([*tune, "--k", "2", "--epochs", "1", *mil]) == EXIT_OK
    assert main(["verify", str(s.root)]) == EXIT_OK
    capsys.readouterr()
    tuned = s.root / "features" / f"{ENCODER}+ft"
    (tuned / "fold0").rename(tuned / "x")
    (tuned / "fold1").rename(tuned / "fold0")
    (tuned / "x").rename(tuned / "fold1")
    shutil.rmtree(s.root / "mil" / f"{ENCODER}+ft")
    assert main(["verify", str(s.root)]) == EXIT_SLIDES_FAILED
    out = capsys.readouterr().out
    assert f"MISMATCH  features/{ENCODER}+ft/fold0/" in out
    assert "not made by the encoder fold0 of the fine-tuning in the study" in out
