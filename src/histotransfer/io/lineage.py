"""Lineage: what every artifact was made from, recorded when it is written and checked when it is read.

Each artifact records the identities of its inputs and a digest of its own content:

- tiles: the slide (id, the path as given, its size and OpenSlide's ``quickhash-1``), the tiling
  settings, a digest of the coordinates and tissue fractions;
- features: the tiles (their digest and tiling), the encoder (id, weights sha256 and source), the
  extraction settings, a digest of the features and coordinates;
- a MIL result: the encoder and weights (per fold for a fine-tuned encoder), the feature set (a digest
  over its files' digests), the tiling, the cohort, and the sha256 of the files it wrote;
- a fine-tuned fold: the frozen MIL head, feature set and weights it started from, the weights it made,
  the sha256 of its files;
- a CKA comparison: both encoders and weights, the tiles it sampled;
- a bundle: the MIL result, fold head, weights and tiling (and bundle.json covers itself);
- a prediction: the slide and the bundle.

h5 files keep the record in their ``lineage`` attribute (canonical JSON), JSON artifacts under a
``lineage`` key. The ``check_*`` functions are what consumers compare before they work; the stage layer
(histotransfer.stages) calls them, and ``histotransfer verify`` (histotransfer.report.verify) walks the chain
with the same comparisons. A mismatch is a LineageError (exit status 2) that names both sides and the
fix. Torch-free: predict and tiling use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histotransfer.core.errors import LineageError
from histotransfer.io.layout import slide_file
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.provenance import canonical_json

LINEAGE = "lineage"  # the h5 attribute / JSON key
SHOWN = 5  # problems listed in one error; the rest are counted


# ------------------------------------------------------------------------------------------ identities


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 over each array's dtype, shape and bytes: what the content *is*, not how it is stored."""
    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array)
        digest.update(f"{a.dtype.str}:{a.shape};".encode())
        digest.update(a.data)  # the buffer itself: no copy
    return digest.hexdigest()


def mapping_digest(items: Mapping[str, Any]) -> str:
    """sha256 of a mapping's canonical JSON (a feature set: slide id -> features digest)."""
    return hashlib.sha256(canonical_json(dict(items)).encode()).hexdigest()


def slide_identity(local: str | os.PathLike[str], slide) -> dict[str, Any]:
    """A cheap fingerprint of an opened slide (an OpenSlide handle): its file size, level-0 size and
    OpenSlide's ``quickhash-1`` (a hash of the slide's properties and lowest-resolution level)."""
    return {
        "size": Path(local).stat().st_size,
        "dimensions": [int(d) for d in slide.dimensions],
        "quickhash": slide.properties.get("openslide.quickhash-1"),
    }


IDENTITY = ("size", "dimensions", "quickhash")


def resume_identity(path: str, identity: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The identity of the slide at ``path`` as a resume key holds it, so that a slide replaced at the
    same path is done again: a local slide's fingerprint (``identity`` when the caller has it, else read
    now: under a millisecond), a gs:// object's content digest (its metadata: one request, no
    download); None when it cannot be read (the work will say why)."""
    if path.startswith("gs://"):
        from histotransfer.io.storage import StorageError, object_identity

        try:
            return {"object": object_identity(path)}
        except StorageError:
            return None
    if identity is not None:
        return {k: identity[k] for k in IDENTITY}
    import openslide

    try:
        with openslide.OpenSlide(path) as slide:
            return slide_identity(path, slide)
    except (openslide.OpenSlideError, OSError):
        return None


def short(digest: str | None) -> str:
    return f"{digest[:12]}..." if digest else "none"


# -------------------------------------------------------------------------------------------- records


def tiles_record(
    record: SlideRecord,
    identity: Mapping[str, Any],
    tiling: str,
    coords: np.ndarray,
    fractions: np.ndarray,
    geometry: Mapping[str, Any],
) -> dict[str, Any]:
    """A tiles file's lineage: the slide it was made from, the tiling settings' hash, its content
    (``tiles_digest`` of the coordinates, fractions and ``geometry``)."""
    return {
        "kind": "tiles",
        "slide": {"id": record.slide_id, "path": record.path, **identity},
        "tiling": tiling,
        "digest": tiles_digest(coords, fractions, geometry),
    }


def features_record(
    *,
    slide_id: str,
    tiles: Mapping[str, Any],
    encoder: Mapping[str, Any],
    extraction: str,
    features: np.ndarray,
    coords: np.ndarray,
) -> dict[str, Any]:
    """A features file's lineage: its slide and tiles (``tiles``: the tiles' lineage), the encoder (id,
    weights sha256 and source), the extraction settings' hash, its content."""
    return {
        "kind": "features",
        "slide_id": slide_id,
        # the slide its tiles were made from (id, path, fingerprint): features made elsewhere have none
        **({"slide": dict(tiles["slide"])} if "slide" in tiles else {}),
        "tiles": {"digest": tiles["digest"], "tiling": tiles["tiling"]},
        "encoder": {k: encoder[k] for k in ("id", "weights_sha256", "weights_source")},
        "extraction": extraction,
        "digest": array_digest(features, coords),
    }


ENCODER = ("id", "weights_sha256", "weights_source")
# The keys of each kind of record (and of the records inside it): a record lacking one is not used.
TILES, BUNDLE_MIL = ("digest", "tiling"), ("dir", "encoder_id", "fold", "head", "features", "cohort")
SHAPES: dict[str, dict[str, tuple[str, ...]]] = {
    "tiles": {"slide": ("id", "path", *IDENTITY), "tiling": (), "digest": ()},
    "features": {"slide_id": (), "tiles": TILES, "encoder": ENCODER, "extraction": (), "digest": ()},
    "mil": {"encoder": (), "extraction": (), "features": (), "tiling": (), "cohort": (), "files": ()},
    "finetune": {"fold": (), "frozen": ("mil", "head", "features", "encoder"), "encoder": ENCODER},
    "cka": {"a": ENCODER, "b": ENCODER, "tiles": ()},
    "bundle": {"mil": BUNDLE_MIL, "encoder": ENCODER, "tiling": ()},
    "prediction": {
        "slide": ("id", "path"),
        "tiles": TILES,
        "bundle": ("path", "integrity", "name"),
        "digest": (),
    },
}


def well_formed(record: Any, kind: str) -> bool:
    """Whether ``record`` is a record of ``kind`` with every key its consumers read."""
    if not isinstance(record, dict) or record.get("kind") != kind:
        return False
    for key, inner in SHAPES[kind].items():
        if key not in record or (
            inner and not (isinstance(record[key], dict) and set(inner) <= set(record[key]))
        ):
            return False
    return True


def h5_attr(record: Mapping[str, Any]) -> str:
    """The record as an h5 attribute value, sealed: its ``integrity`` covers the rest of it."""
    from histotransfer.io.provenance import INTEGRITY, integrity

    content = json.loads(canonical_json(dict(record)))
    return canonical_json({**content, INTEGRITY: integrity(content)})


def parse_attr(raw: Any, kind: str) -> dict[str, Any] | None:
    """An h5 ``lineage`` attribute's record of ``kind``; None when there is none, or it is not JSON, not
    intact (changed after it was written) or lacks a key."""
    from histotransfer.io.provenance import intact

    try:
        record = json.loads(str(raw)) if raw is not None else None
    except (ValueError, RecursionError):
        return None
    return record if well_formed(record, kind) and intact(record) else None


def read_record(path: str | os.PathLike[str], kind: str) -> dict[str, Any] | None:
    """The record of ``kind`` an artifact keeps (an h5 attribute, or a sealed JSON file's key); None when
    it keeps none, or a damaged or changed one (see parse_attr)."""
    from histotransfer.io.provenance import intact

    path = Path(path)
    try:
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                return parse_attr(f.attrs.get(LINEAGE), kind)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not intact(data):
        return None
    record = data.get(LINEAGE)
    return record if well_formed(record, kind) else None


NO_RECORD = "records no readable lineage (made by an older histotransfer or another tool, or changed since)"


def _fail(problems: Sequence[str], what: str) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:SHOWN])
    more = f"\n  ... ({len(problems)} in all)" if len(problems) > SHOWN else ""
    raise LineageError(f"{what}:\n  {shown}{more}" if len(problems) > 1 else f"{problems[0]}")


# ---------------------------------------------------------------------------------------------- tiles


def tiles_digest(coords: np.ndarray, fractions: np.ndarray, geometry: Mapping[str, Any]) -> str:
    """A tiles file's content: its coordinates, tissue fractions and the geometry that reads them
    (level, read size, tile size, level-0 footprint and stride, mpp, the slide's level-0 size)."""
    return hashlib.sha256(
        (array_digest(coords, fractions) + canonical_json(dict(geometry))).encode()
    ).hexdigest()


def same_slide(path: str, recorded: Mapping[str, Any]) -> bool:
    """Whether the slide at ``path`` (a local file) is the one a record names: same size, level-0 size
    and quickhash (a moved slide is still the same slide); a missing file is not. A gs:// URI is
    compared as text."""
    if path.startswith("gs://"):
        return path == recorded.get("path")
    if not Path(path).is_file():
        return False
    return resume_identity(path) == {k: recorded.get(k) for k in IDENTITY}


def _damaged(path: Path, redo: str) -> str:
    return f"{path} {NO_RECORD}: move it away, then {redo}"


def _manifest_names(slide: Mapping[str, Any], record: SlideRecord, what: str) -> str | None:
    """Why ``slide`` (a record's slide: id and path) is not the manifest's ``record``, or None."""
    if slide.get("id") != record.slide_id:
        return (
            f"{what} holds the tiles of slide {slide.get('id')!r}, not of {record.slide_id!r} (a renamed "
            "file?): restore the name, or tile that slide again (histotransfer tile ... --overwrite)"
        )
    if slide.get("path") != record.path and not same_slide(record.path, slide):
        return (
            f"{record.slide_id}: its tiles were made from {slide.get('path')}, but the manifest lists "
            f"{record.path} (another file): correct the manifest, or tile again with --overwrite"
        )
    return None


def check_tiles(tiles_dir: Path, records: Iterable[SlideRecord]) -> dict[str, dict[str, Any]]:
    """Each slide's tiles file (where tiling made one) was made from the slide the manifest lists under
    that id: its recorded id is the file's, its recorded path the manifest's (or the slide there is the
    same slide, moved); all were made with one tiling. Returns the tiles records by slide id."""
    problems, found, tilings = [], {}, {}
    for r in records:
        path = slide_file(tiles_dir, r.slide_id)
        if not path.is_file():
            continue
        if (rec := read_record(path, "tiles")) is None:
            problems.append(_damaged(path, f"tile {r.slide_id} again (histotransfer tile ... --overwrite)"))
            continue
        if why := _manifest_names(rec["slide"], r, str(path)):
            problems.append(why)
        tilings.setdefault(rec["tiling"], []).append(r.slide_id)
        found[r.slide_id] = rec
    if len(tilings) > 1:
        parts = "; ".join(
            f"{t[:8]}: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}" for t, ids in tilings.items()
        )
        problems.append(
            f"{tiles_dir} mixes tiles made with {len(tilings)} tiling settings ({parts}): tile the whole "
            "cohort into a new folder with one config"
        )
    _fail(problems, f"the tiles in {tiles_dir} do not belong to this manifest's slides")
    return found


def check_slide(tiles: Mapping[str, Any], local: Path, slide) -> None:
    """A slide opened (``slide``: the OpenSlide handle of ``local``) to read its tiles is the one they
    were made from (size, level-0 size, quickhash); ``tiles``: the tiles file's lineage."""
    recorded = tiles["slide"]
    now = slide_identity(local, slide)
    if now != {k: recorded.get(k) for k in IDENTITY}:
        raise LineageError(
            f"{local} is not the slide {recorded.get('id')!r} was tiled from (now {_identity(now)}; "
            f"tiled: {_identity(recorded)}): the file changed since tiling; tile it again with "
            "--overwrite, then extract again"
        )


def _identity(identity: Mapping[str, Any]) -> str:
    w, h = identity.get("dimensions") or (None, None)
    return f"{identity.get('size')} bytes, {w}x{h} px, quickhash {short(identity.get('quickhash'))}"


def check_slides(records: Iterable[SlideRecord], tiles: Mapping[str, Mapping[str, Any]]) -> None:
    """Every slide a stage will read tiles from (``tiles``: their records by slide id) is still the slide
    they were made from (``check_slide``; a gs:// slide's cached copy, which the stage reads next)."""
    import openslide

    from histotransfer.io.storage import StorageError, fetch_gcs

    problems = []
    for r in records:
        if r.slide_id not in tiles:
            continue
        try:
            local = fetch_gcs(r.path) if r.path.startswith("gs://") else Path(r.path)  # read next anyway
            with openslide.OpenSlide(str(local)) as slide:
                check_slide(tiles[r.slide_id], local, slide)
        except (LineageError, StorageError, openslide.OpenSlideError, OSError) as exc:
            problems.append(str(exc))
    _fail(problems, "slides changed since they were tiled")


# ------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSet:
    """What one folder of features was made from, checked to be one encoder and one extraction."""

    folder: Path
    encoder: dict[str, Any]  # id, weights_sha256, weights_source
    extraction: str
    tiling: str
    slides: dict[str, str]  # slide id -> features digest

    @property
    def digest(self) -> str:
        return mapping_digest(self.slides)


def _features_problems(path: Path, r: SlideRecord, expected: str, tiles) -> tuple[dict | None, list[str]]:
    """One features file's record and what is wrong with it (shapes, name, folder, slide, tiles)."""
    import h5py

    redo = f"extract {r.slide_id} again (histotransfer extract ... --overwrite)"
    try:
        with h5py.File(path, "r") as f:
            shapes = {name: f[name].shape for name in ("features", "coords") if name in f}
            rec = parse_attr(f.attrs.get(LINEAGE), "features")
    except OSError as exc:
        return None, [f"{path}: not a readable h5 file ({exc}): move it away, then {redo}"]
    n = shapes.get("features", (None,))[0]
    if len(shapes.get("features", ())) != 2 or shapes.get("coords") != (n, 2):
        return None, [
            f"{path}: datasets `features` {shapes.get('features')} and `coords` {shapes.get('coords')} are "
            f"not (n, dim) and (n, 2): not a features file of this format; move it away, then {redo}"
        ]
    if rec is None:
        return None, [_damaged(path, redo)]
    problems = []
    if rec["slide_id"] != r.slide_id:
        problems.append(f"{path} holds the features of slide {rec['slide_id']!r}, not of {r.slide_id!r}")
    elif isinstance(slide := rec.get("slide"), dict) and (why := _manifest_names(slide, r, str(path))):
        problems.append(why)
    if rec["encoder"]["id"] != expected:
        problems.append(
            f"{path} was made by encoder {rec['encoder']['id']}, but lies in the folder of {expected}"
        )
    if (
        tiles is not None
        and (t := tiles.get(r.slide_id)) is not None
        and rec["tiles"]["digest"] != t["digest"]
    ):
        problems.append(
            f"{path} was extracted from other tiles than the study's {r.slide_id}.h5 (tiled again since?): "
            "extract again with --overwrite"
        )
    return rec, problems


def check_features(
    folder: Path,
    records: Iterable[SlideRecord],
    *,
    encoder_id: str | None = None,
    tiles: Mapping[str, Mapping[str, Any]] | None = None,
) -> FeatureSet:
    """The features files in ``folder`` for ``records`` (those that exist) are one encoder's with one set
    of weights and settings (``encoder_id``, default: the folder's name), each of the slide the manifest
    lists under its name, made from the tiles now in the study (``tiles``: their records by slide id,
    from check_tiles)."""
    expected = encoder_id or folder.name
    problems: list[str] = []
    groups: dict[str, list[str]] = {}
    first: dict[str, Any] | None = None
    slides: dict[str, str] = {}
    for r in records:
        path = slide_file(folder, r.slide_id)
        if not path.is_file():
            continue
        rec, found = _features_problems(path, r, expected, tiles)
        problems += found
        if rec is None:
            continue
        key = canonical_json([rec["encoder"]["weights_sha256"], rec["extraction"], rec["tiles"]["tiling"]])
        groups.setdefault(key, []).append(r.slide_id)
        first = first or rec
        slides[r.slide_id] = rec["digest"]
    if len(groups) > 1:
        parts = [
            f"{len(ids)} slide(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}) with weights "
            f"{short(json.loads(k)[0])}, extraction {json.loads(k)[1][:8]}, tiling {json.loads(k)[2][:8]}"
            for k, ids in groups.items()
        ]
        problems.append(
            f"{folder} mixes features of different weights or settings: {'; '.join(parts)}: extract the "
            "whole cohort again with one encoder and config (--overwrite)"
        )
    _fail(problems, f"the features in {folder} cannot be used")
    if first is None:
        return FeatureSet(folder, {"id": expected}, "", "", {})
    return FeatureSet(folder, dict(first["encoder"]), first["extraction"], first["tiles"]["tiling"], slides)


# ------------------------------------------------------------------------------------- trained models


def check_weights(
    what: str, recorded: Mapping[str, Any], weights_sha256: str, weights_source: str, fix: str
) -> None:
    """The weights a consumer was given are the ones ``recorded`` (an encoder record) names."""
    if recorded.get("weights_sha256") != weights_sha256:
        raise LineageError(
            f"{what} was made from the weights {recorded.get('weights_source')} (tensors sha256 "
            f"{short(recorded.get('weights_sha256'))}), but the weights given are {weights_source} "
            f"(tensors sha256 {short(weights_sha256)}): {fix}"
        )


def check_file(path: Path, recorded: str | None, what: str, fix: str) -> None:
    """A file an artifact recorded (a fold's head, a fine-tuned encoder) still has the sha256 it had."""
    from histotransfer.io.provenance import sha256_file

    if recorded is None:
        raise LineageError(f"{what} records no sha256 for {path} (made by an older histotransfer): {fix}")
    if not path.is_file():
        raise LineageError(f"{path} is missing ({what} was made with it): {fix}")
    if (actual := sha256_file(path)) != recorded:
        raise LineageError(
            f"{path} changed after {what} was made (sha256 {short(actual)}, recorded "
            f"{short(recorded)}): {fix}"
        )


def files_record(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each named file under ``folder`` (relative names): what an artifact wrote."""
    from histotransfer.io.provenance import sha256_file

    return {name: sha256_file(folder / name) for name in names}


def cohort_digest(records: Iterable[SlideRecord]) -> str:
    """The cohort a model was trained on: each slide's id, label, patient and split."""
    return mapping_digest({r.slide_id: [r.label, r.patient_id, r.split] for r in records})


def mil_record(
    feature_sets: Mapping[str, FeatureSet], records: Sequence[SlideRecord], files: Mapping[str, str]
) -> dict[str, Any]:
    """A MIL result's lineage. ``feature_sets``: by fold (``fold{k}``) for per-fold (fine-tuned)
    encoders, else one under ``*``; ``files``: the sha256 of the files it wrote, by relative path."""
    tilings = sorted({fs.tiling for fs in feature_sets.values()})
    return {
        "kind": "mil",
        "encoder": {k: fs.encoder for k, fs in feature_sets.items()},
        "extraction": {k: fs.extraction for k, fs in feature_sets.items()},
        "features": {k: fs.digest for k, fs in feature_sets.items()},
        "tiling": tilings[0] if len(tilings) == 1 else tilings,
        "cohort": cohort_digest(records),
        "files": dict(files),
    }


def of_fold(mapping: Mapping[str, Any], fold: int) -> Any:
    """A MIL record's entry for fold ``fold`` (per-fold encoders), else its one entry."""
    return mapping.get(f"fold{fold}", mapping.get("*"))


def check_mil(
    mil_dir: Path,
    record: Mapping[str, Any] | None,
    *,
    folds: Iterable[int],
    weights: tuple[str, str] | None = None,
    features: FeatureSet | None = None,
    records: Sequence[SlideRecord] | None = None,
    tiling: str | None = None,
    weights_fix: str = "",
) -> None:
    """What a consumer of a MIL result (export, fine-tuning) is about to use with it matches what the
    result was trained on: the fold heads are the files it wrote, ``weights`` ((sha256, source) of the
    encoder built for it) are the weights its features were extracted with, ``features`` is the feature
    set it read, ``records`` the cohort (ids, labels, patients, splits), ``tiling`` the tiling settings."""
    what = f"the MIL result {mil_dir}"
    retrain = "train it again (histotransfer train ... --overwrite, or rerun the study)"
    if not well_formed(record, "mil"):
        raise LineageError(f"{what}: its metrics.json {NO_RECORD}: {retrain}")
    for fold in folds:
        name = f"fold{fold}/model.pt"
        check_file(mil_dir / name, record["files"].get(name), what, retrain)
        if weights is not None:
            check_weights(what, of_fold(record["encoder"], fold) or {}, *weights, weights_fix)
    if features is not None and record["features"].get("*") != features.digest:
        raise LineageError(
            f"the features in {features.folder} changed after {what} was trained on them (feature set "
            f"{short(features.digest)}, trained on {short(record['features'].get('*'))}): {retrain}"
        )
    if records is not None and record["cohort"] != cohort_digest(records):
        raise LineageError(
            f"{what} was trained on another cohort than this manifest's (slide ids, labels, patients or "
            f"splits differ): use the manifest it was trained with, or {retrain}"
        )
    if tiling is not None and record["tiling"] != tiling:
        raise LineageError(
            f"{what} was trained on features of tiles made with other tiling settings "
            f"({str(record['tiling'])[:8]}) than the tiles given ({tiling[:8]}): give the study's own "
            "tiles folder (--tiles)"
        )


def finetune_record(frozen_dir: Path, fold: int, head: str, features: FeatureSet, tuned: Mapping[str, Any]):
    """A fine-tuned fold's lineage: the frozen MIL head (sha256) and feature set it started from, and
    the fine-tuned encoder it made (``tuned``: id, weights sha256 and source)."""
    return {
        "kind": "finetune",
        "fold": fold,
        "frozen": {
            "mil": str(frozen_dir),
            "head": head,
            "features": features.digest,
            "encoder": features.encoder,
        },
        "encoder": dict(tuned),
    }


def check_finetuned_file(history: Path, file: Path) -> None:
    """A file of a fine-tuned fold (its ``encoder.pt``) is the one that fold wrote (``history``: the
    fold's history.json, which records its sha256)."""
    from histotransfer.core.errors import ArtifactError
    from histotransfer.io.provenance import read_json

    fix = "fine-tune again (histotransfer finetune ... --overwrite, or rerun the study)"
    try:
        files = read_json(history, redo=fix, keys=("files",))["files"]
    except ArtifactError as exc:
        raise LineageError(str(exc)) from None
    recorded = files.get(file.name) if isinstance(files, dict) else None
    check_file(file, recorded, f"the fine-tuning of {history.parent}", fix)


def check_finetuned(history: Path, encoder) -> None:
    """An encoder built from a fine-tuned fold's ``encoder.pt`` has the weights that fold made
    (``history``: the fold's history.json, which records them)."""
    record = read_record(history, "finetune")
    fix = "fine-tune again (histotransfer finetune ... --overwrite, or rerun the study)"
    if record is None:
        raise LineageError(_damaged(history, fix))
    what = f"the fine-tuned encoder of {history.parent}"
    check_weights(what, record["encoder"], encoder.weights_sha256, encoder.weights_source, fix)


def cka_record(a: Mapping[str, Any], b: Mapping[str, Any], tiles: Mapping[str, str]) -> dict[str, Any]:
    """A CKA comparison's lineage: both encoders (id, weights sha256 and source) and the tiles sampled
    (``tiles``: slide id -> tiles digest of the slides sampled)."""
    return {"kind": "cka", "a": dict(a), "b": dict(b), "tiles": dict(tiles)}
