"""`histotransfer verify PATH`: were these predictions made from these slides with these weights?

Walks the lineage (histotransfer.lineage) of a study, a bundle, a predictions folder or any artifact
folder of a study, and says for each artifact what it was made from and whether those inputs still
match, by content: each file's recorded digest against its content now, each recorded input against the
artifact that is there now (tiles against their slide, features against their tiles, a MIL result
against its features and fold heads, fine-tuning against its frozen head, CKA and bundles against the
weights, predictions against their bundle and slide). Time stamps play no part. Torch-free.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histotransfer import lineage
from histotransfer.errors import BundleError, LayoutError, LineageError
from histotransfer.layout import BUNDLE_SPEC, SECTIONS, MILLayout, PredictionLayout, StudyLayout
from histotransfer.lineage import mapping_digest, read_record, short


@dataclass
class Finding:
    """One artifact: what it was made from, and what no longer matches (nothing: it verifies)."""

    artifact: str  # where it is, relative to the folder verified
    made_from: str
    problems: list[str] = field(default_factory=list)
    redo: str = ""
    notes: list[str] = field(default_factory=list)  # inputs that could not be checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Verification:
    path: Path
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def lines(self) -> list[str]:
        bad = sum(not f.ok for f in self.findings)
        head = f"verify {self.path}: {len(self.findings)} artifact(s), "
        out = [head + ("all match what they were made from" if not bad else f"{bad} do not match")]
        for f in self.findings:
            out.append(f"  {'ok      ' if f.ok else 'MISMATCH'}  {f.artifact}: {f.made_from}")
            out += [f"            - {p}" for p in f.problems[: lineage.SHOWN]]
            if len(f.problems) > lineage.SHOWN:
                out.append(f"            - ... ({len(f.problems)} in all)")
            out += [f"            note: {n}" for n in f.notes]
            if f.problems and f.redo:
                out.append(f"            redo: {f.redo}")
        return out

    def markdown(self) -> str:
        rows = ["| artifact | made from | status |", "|---|---|---|"]
        for f in self.findings:
            status = "ok" if f.ok else "**mismatch**: " + "; ".join(f.problems[:3]) + f" (redo: {f.redo})"
            rows.append(f"| `{f.artifact}` | {f.made_from} | {status} |".replace("\n", " "))
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------- walking


def verify(path: str | Path) -> Verification:
    """Verify everything under ``path`` (a study, a bundle, a predictions folder, or one artifact folder
    of a study); a LayoutError when ``path`` holds nothing histotransfer made."""
    path = Path(path)
    if not path.is_dir():
        raise LayoutError(
            f"{path} is not a folder: give a study, a bundle, predictions or an artifact folder"
        )
    root = _study_root(path)
    layout = StudyLayout.at(root) if root is not None else None
    findings = [f for check in _checks(path, layout) for f in check()]
    if not findings:
        raise LayoutError(
            f"{path} holds no artifact histotransfer made (tiles, features, MIL results, fine-tuning, CKA, "
            "bundles or predictions): give a study folder or one of its artifact folders"
        )
    base = str(root if root is not None else path).rstrip("/") + "/"
    for f in findings:
        f.artifact = f.artifact.removeprefix(base)
    return Verification(path, findings)


def _study_root(path: Path) -> Path | None:
    """The study ``path`` is (or lies in): the nearest folder holding sections of a study."""
    for folder in (path, *path.parents):
        if sum((folder / s).is_dir() for s in SECTIONS if s != "cohort") >= 2:
            return folder
    return None


def _checks(path: Path, layout: StudyLayout | None) -> list[Callable[[], list[Finding]]]:
    """What to check under ``path``: the whole study at its root, else the artifacts ``path`` holds."""
    if (path / BUNDLE_SPEC).is_file():
        return [lambda: [_bundle(path, layout)]]
    if (path / "predictions.csv").is_file() and (path / "slides").is_dir():
        return [lambda: [_predictions(PredictionLayout(path))]]
    if layout is None:
        return [lambda: _loose(path)]
    checks = []

    def within(folder: Path) -> bool:  # an artifact under the folder verified, or holding it
        return folder.is_relative_to(path) or path.is_relative_to(folder)

    if within(layout.tiles) and layout.tiles.is_dir():
        checks.append(lambda: [_tiles(layout.tiles)])
    for folder in sorted(layout.features.glob("*/")) if layout.features.is_dir() else []:
        folds = sorted(p for p in folder.glob("fold*/") if p.is_dir())
        for sub in folds or [folder]:
            if within(sub):
                checks.append(lambda sub=sub, folder=folder: [_features(sub, folder.name, layout)])
    for mil in layout.mil_results() if layout.mil.is_dir() else []:
        if within(mil.dir):
            checks.append(lambda mil=mil: [_mil(mil, layout)])
    for history in sorted(layout.finetune.glob("*/fold*/history.json")) if layout.finetune.is_dir() else []:
        if within(history.parent):
            checks.append(lambda history=history: [_finetune(history, layout)])
    for result in layout.cka_results() if layout.cka.is_dir() else []:
        if within(result):
            checks.append(lambda result=result: [_cka(result, layout)])
    for bundle in layout.bundles() if layout.onnx.is_dir() else []:
        if within(bundle):
            checks.append(lambda bundle=bundle: [_bundle(bundle, layout)])
    return checks


def _loose(path: Path) -> list[Finding]:
    """A folder outside a study: tiles or features by what its files record."""
    first = next((read_record(p) for p in sorted(path.glob("*.h5"))), None) or {}
    if first.get("kind") == "tiles":
        return [_tiles(path)]
    if first.get("kind") == "features":
        return [_features(path, path.name, None)]
    return []


# -------------------------------------------------------------------------------------------- checks


def _h5_digest(path: Path, names: Iterable[str]) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return lineage.array_digest(*(f[name][:] for name in names))


def _records(folder: Path, kind: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The lineage of each ``*.h5`` in ``folder`` by file stem, and a problem per file without one."""
    found, problems = {}, []
    for path in sorted(folder.glob("*.h5")):
        record = read_record(path)
        if record is None or record.get("kind") != kind:
            problems.append(
                f"{path.name} records no lineage (made by an older histotransfer or another tool)"
            )
        else:
            found[path.stem] = record
    return found, problems


def _tiles(folder: Path) -> Finding:
    records, problems = _records(folder, "tiles")
    notes = set()
    for slide_id, rec in records.items():
        if _h5_digest(folder / f"{slide_id}.h5", ("coords", "tissue_fraction")) != rec["digest"]:
            problems.append(f"{slide_id}.h5 was changed after tiling (its content does not match its digest)")
        if rec["slide"]["id"] != slide_id:
            problems.append(f"{slide_id}.h5 holds the tiles of slide {rec['slide']['id']!r} (renamed?)")
        slide = rec["slide"]
        if str(slide.get("path", "")).startswith("gs://"):
            notes.add("slides on gs:// are not opened (their tiles' records are checked)")
        elif not Path(slide["path"]).is_file():
            problems.append(f"{slide_id}: its slide {slide['path']} is gone")
        elif not lineage.same_slide(slide["path"], slide):
            problems.append(
                f"{slide_id}: the slide {slide['path']} changed since tiling (size, dimensions or quickhash)"
            )
    tilings = sorted({rec["tiling"][:8] for rec in records.values()})
    return Finding(
        str(folder) + "/",
        f"{len(records)} slide(s), each from its slide file, tiling {', '.join(tilings) or 'none'}",
        problems,
        f"tile these slides again: histotransfer tile MANIFEST --out {folder} --overwrite",
        sorted(notes),
    )


def _features(folder: Path, encoder_id: str, layout: StudyLayout | None) -> Finding:
    records, problems = _records(folder, "features")
    tiles = {}
    if layout is not None and layout.tiles.is_dir():
        tiles = {p.stem: r for p in layout.tiles.glob("*.h5") if (r := read_record(p)) is not None}
    for slide_id, rec in records.items():
        if _h5_digest(folder / f"{slide_id}.h5", ("features", "coords")) != rec["digest"]:
            problems.append(
                f"{slide_id}.h5 was changed after extraction (its content does not match its digest)"
            )
        if rec["slide_id"] != slide_id:
            problems.append(f"{slide_id}.h5 holds the features of slide {rec['slide_id']!r}")
        if rec["encoder"]["id"] != encoder_id:
            problems.append(f"{slide_id}.h5 was made by {rec['encoder']['id']}, not {encoder_id}")
        if tiles and (t := tiles.get(slide_id)) is None:
            problems.append(f"{slide_id}: its tiles file is gone")
        elif tiles and t["digest"] != rec["tiles"]["digest"]:
            problems.append(f"{slide_id}: extracted from other tiles than the study's (tiled again since)")
    weights = {(r["encoder"]["weights_source"], r["encoder"]["weights_sha256"]) for r in records.values()}
    if len(weights) > 1:
        problems.append(f"the folder mixes {len(weights)} sets of weights")
    shown = ", ".join(f"{s} (sha256 {short(h)})" for s, h in sorted(weights)[:2]) or "no weights recorded"
    notes = [] if tiles or layout is None else ["the study has no tiles folder: tiles not compared"]
    return Finding(
        str(folder) + "/",
        f"{len(records)} slide(s) by {encoder_id} with {shown}",
        problems,
        f"extract again: histotransfer extract MANIFEST --tiles TILES --encoder {encoder_id} --out "
        f"{folder.parent if not folder.name.startswith('fold') else folder.parent.parent} --overwrite",
        notes,
    )


def _feature_set_now(folder: Path, slide_ids: Iterable[str]) -> str | None:
    """The digest of the feature set ``folder`` holds now for ``slide_ids`` (None: a file is missing)."""
    digests = {}
    for slide_id in slide_ids:
        record = read_record(folder / f"{slide_id}.h5")
        if record is None:
            return None
        digests[slide_id] = record["digest"]
    return mapping_digest(digests)


def _files_now(folder: Path, recorded: dict[str, str], what: str) -> list[str]:
    from histotransfer.provenance import sha256_file

    problems = []
    for name, sha in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is gone")
        elif sha256_file(path) != sha:
            problems.append(f"{name} was changed after {what} wrote it")
    return problems


def _slides_of(mil: MILLayout) -> list[str]:
    with mil.predictions.open(newline="", encoding="utf-8") as f:
        return [row["slide_id"] for row in csv.DictReader(f)]


def _mil(mil: MILLayout, layout: StudyLayout) -> Finding:
    try:
        metrics = json.loads(mil.metrics.read_text(encoding="utf-8"))
        record = metrics.get("lineage")
    except (OSError, ValueError) as exc:
        return Finding(
            str(mil.dir) + "/", "unreadable", [f"metrics.json cannot be read ({exc})"], _train(mil)
        )
    if not isinstance(record, dict) or record.get("kind") != "mil":
        return Finding(
            str(mil.dir) + "/", "no lineage recorded", ["metrics.json records no lineage"], _train(mil)
        )
    problems = _files_now(mil.dir, record["files"], "training")
    slides = _slides_of(mil) if mil.predictions.is_file() else []
    encoder_id, notes = metrics["encoder_id"], []
    for key, digest in record["features"].items():
        folder = layout.features_dir(encoder_id) if key == "*" else layout.features_dir(encoder_id) / key
        if not folder.is_dir():
            notes.append(f"its features {folder} are not here: not compared")
        elif _feature_set_now(folder, slides) != digest:
            problems.append(f"its features in {folder} changed after training, or are gone")
    encoders = list(record["encoder"].values())
    return Finding(
        str(mil.dir) + "/",
        f"{len(slides)} slide(s) of features by {encoder_id} with {encoders[0].get('weights_source')}"
        + (f" (one encoder per fold, {len(encoders)})" if len(encoders) > 1 else ""),
        problems,
        _train(mil),
        notes,
    )


def _train(mil: MILLayout) -> str:
    return (
        f"train again: histotransfer train MANIFEST --features FEATURES/{mil.dir.name} --out "
        f"{mil.dir.parent} --overwrite"
    )


def _finetune(history: Path, layout: StudyLayout) -> Finding:
    encoder_id, fold = history.parent.parent.name, int(history.parent.name.removeprefix("fold"))
    redo = (
        f"fine-tune again: histotransfer finetune MANIFEST --study {layout.root} --encoder {encoder_id} "
        "--overwrite"
    )
    record = read_record(history)
    if record is None or record.get("kind") != "finetune":
        return Finding(
            str(history.parent) + "/", "no lineage recorded", ["history.json records no lineage"], redo
        )
    files = json.loads(history.read_text(encoding="utf-8")).get("files", {})
    problems = _files_now(history.parent, files, "fine-tuning")
    frozen = layout.mil_result(encoder_id)
    head = _files_now(frozen.dir, {f"fold{fold}/model.pt": record["frozen"]["head"]}, "MIL")
    problems += [f"the frozen MIL head it started from: {p}" for p in head]
    notes, features = [], layout.features_dir(encoder_id)
    if not features.is_dir() or not frozen.predictions.is_file():
        notes.append(f"the frozen features of {encoder_id} are not here: not compared")
    elif _feature_set_now(features, _slides_of(frozen)) != record["frozen"]["features"]:
        problems.append(f"the frozen features of {encoder_id} changed after fine-tuning, or are gone")
    source, head_sha = record["frozen"]["encoder"].get("weights_source"), short(record["frozen"]["head"])
    return Finding(
        str(history.parent) + "/",
        f"fold {fold} of {encoder_id} ({source}) fine-tuned from the MIL head {head_sha}, making weights "
        f"{short(record['encoder']['weights_sha256'])}",
        problems,
        redo,
        notes,
    )


def _recorded_weights(layout: StudyLayout, encoder_id: str) -> str | None:
    """The weights the study's features of ``encoder_id`` (``{id}+ft-fold{k}``: that fold's fine-tuned
    encoder) record now."""
    base, _, fold = encoder_id.partition("-fold")
    if fold.isdigit() and base.endswith("+ft"):
        record = read_record(layout.finetune_fold(base.removesuffix("+ft"), int(fold)).history)
        return None if record is None else record["encoder"]["weights_sha256"]
    folder = layout.features_dir(encoder_id)
    record = next((read_record(p) for p in sorted(folder.glob("*.h5"))), None) if folder.is_dir() else None
    return None if record is None else record["encoder"]["weights_sha256"]


def _cka(path: Path, layout: StudyLayout) -> Finding:
    record = read_record(path)
    redo = f"compare again: histotransfer cka MANIFEST --study {layout.root} --encoder ENCODER"
    if record is None or record.get("kind") != "cka":
        return Finding(str(path), "no lineage recorded", [f"{path.name} records no lineage"], redo)
    data = json.loads(path.read_text(encoding="utf-8"))
    problems, notes = [], []
    for side in ("a", "b"):
        name, used = data[side], record[side]
        now = _recorded_weights(layout, name)
        if now is None:
            notes.append(
                f"{name}: no features or fine-tuned encoder of it in the study to compare weights with"
            )
        elif now != used["weights_sha256"]:
            problems.append(
                f"{name}: compared with weights {short(used['weights_sha256'])}, the study's are {short(now)}"
            )
    for slide_id, digest in record["tiles"].items():
        tiles = read_record(layout.tiles_file(slide_id))
        if tiles is None or tiles["digest"] != digest:
            problems.append(f"the tiles of {slide_id} it sampled changed or are gone")
    made = f"{record['a']['id']} vs {record['b']['id']} on tiles of {len(record['tiles'])} slide(s)"
    return Finding(str(path), made, problems, redo, notes)


def _bundle(folder: Path, layout: StudyLayout | None) -> Finding:
    from histotransfer.deploy.bundle import read_spec, verify_files

    redo = f"export again: histotransfer export --mil MIL_RESULT --out {folder} --overwrite"
    try:
        spec = read_spec(folder)
        verify_files(folder, spec)
    except BundleError as exc:
        return Finding(str(folder) + "/", "unreadable", [str(exc)], redo)
    record, problems, notes = spec.lineage, [], []
    made = (
        f"{spec.encoder.id} ({spec.encoder.weights_source}) with the MIL head of fold {spec.aggregator.fold}"
    )
    if record.get("kind") != "bundle":
        return Finding(str(folder) + "/", made, [], redo, ["records no lineage (made outside a study)"])
    mil = record["mil"]
    candidates = [layout.mil_result(mil["encoder_id"]).dir] if layout is not None else []
    source = next((d for d in [*candidates, Path(mil["dir"])] if (d / "metrics.json").is_file()), None)
    if source is None:
        notes.append(f"its MIL result {mil['dir']} is not here: the head and weights are not compared")
    else:
        problems += [
            f"its MIL result: {p}"
            for p in _files_now(source, {f"fold{mil['fold']}/model.pt": mil["head"]}, "MIL")
        ]
        trained = (read_record(MILLayout(source).metrics) or {}).get("encoder", {})
        recorded = lineage.of_fold(trained, mil["fold"]) or {}
        if recorded.get("weights_sha256") != record["encoder"]["weights_sha256"]:
            problems.append(f"its encoder's weights are not those {source} was trained on")
    return Finding(str(folder) + "/", made, problems, redo, notes)


def _predictions(out: PredictionLayout) -> Finding:
    from histotransfer.deploy.bundle import read_spec

    records, problems = _records(out.dir / "slides", "prediction")
    notes, bundles = set(), {}
    for slide_id, rec in records.items():
        path = Path(rec["bundle"]["path"])
        if path not in bundles:
            try:
                bundles[path] = read_spec(path).integrity
            except BundleError:
                bundles[path] = None
        if bundles[path] is None:
            notes.add(f"the bundle {path} is not here (or not readable): not compared")
        elif bundles[path] != rec["bundle"]["integrity"]:
            problems.append(f"{slide_id}: predicted by another export of {path} than the one there now")
        slide = rec["slide"]
        if str(slide.get("path", "")).startswith("gs://"):
            notes.add("slides on gs:// are not opened")
        elif not lineage.same_slide(slide["path"], slide):
            problems.append(
                f"{slide_id}: the slide {slide['path']} changed or is gone since it was predicted"
            )
    names = sorted({r["bundle"]["name"] for r in records.values()})
    return Finding(
        str(out.dir) + "/",
        f"{len(records)} slide(s) predicted by the bundle(s) {', '.join(names) or 'none'}",
        problems,
        f"predict again: histotransfer predict SLIDES --bundle BUNDLE --out {out.dir} --overwrite",
        sorted(notes),
    )


def check(path: str | Path) -> Verification:
    """verify(path), as the report and pipelines use it: never raises for a study it cannot read."""
    try:
        return verify(path)
    except (LayoutError, LineageError, OSError, ValueError) as exc:
        return Verification(Path(path), [Finding(str(path), "not verifiable", [str(exc)])])
