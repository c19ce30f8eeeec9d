"""`histotransfer verify PATH`: were these predictions made from these slides with these weights?

Walks the lineage (histotransfer.io.lineage) of a study, a bundle, a predictions folder or any artifact
folder of a study, and says for each artifact what it was made from and whether those inputs still
match, by content: each file's recorded digest against its content now, each recorded input against the
artifact that is there now (tiles against their slide, features against their tiles, a MIL result
against its features and fold heads, fine-tuning against its frozen head, CKA and bundles against the
weights, predictions against their bundle and slide). Time stamps play no part. Torch-free.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histotransfer.core.errors import BundleError, LayoutError, LineageError
from histotransfer.io import lineage
from histotransfer.io.layout import BUNDLE_SPEC, SECTIONS, MILLayout, PredictionLayout, StudyLayout
from histotransfer.io.lineage import mapping_digest, read_record, short


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


def verify(path: str | Path, *, deep: bool = True) -> Verification:
    """Verify everything under ``path`` (a study, a bundle, a predictions folder, or one artifact folder
    of a study); a LayoutError when ``path`` holds nothing histotransfer made. ``deep=False`` compares
    the records only (what each artifact recorded against what the others record, and that the files
    exist), without reading content (arrays, weights, slides): what the report shows at any scale."""
    token = _DEEP.set(deep)
    try:
        return _verify(Path(path))
    finally:
        _DEEP.reset(token)


_DEEP: ContextVar[bool] = ContextVar("deep", default=True)  # read content, or records only (verify)


def _verify(path: Path) -> Verification:
    if not path.exists():
        raise LayoutError(f"{path} does not exist: give a study, a bundle, predictions or an artifact folder")
    if not path.is_dir():
        raise LayoutError(f"{path} is a file: give the folder it belongs to (a study, a bundle, predictions)")
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


def _guarded(artifact: Path, check: Callable[[], Finding], redo: str = "") -> Callable[[], list[Finding]]:
    """``check`` of one artifact; records damaged past what their checks expect are that artifact's
    mismatch, not a crash of the walk."""

    def run() -> list[Finding]:
        try:
            return [check()]
        except (
            KeyError,
            TypeError,
            AttributeError,
            ValueError,
            IndexError,
            OSError,
            csv.Error,
            RecursionError,
        ) as exc:
            why = f"its files or records are damaged ({type(exc).__name__}: {str(exc)[:200]})"
            return [Finding(f"{artifact}/", "unreadable", [why], redo or "make it again")]

    return run


def _checks(path: Path, layout: StudyLayout | None) -> list[Callable[[], list[Finding]]]:
    """What to check under ``path``: the whole study at its root, else the artifacts ``path`` holds."""
    if (path / BUNDLE_SPEC).is_file():
        return [_guarded(path, lambda: _bundle(path, layout))]
    if (path / "predictions.csv").is_file() and (path / "slides").is_dir():
        return [_guarded(path, lambda: _predictions(PredictionLayout(path)))]
    if layout is None:
        return [_guarded(path, lambda: _loose(path))] if list(path.glob("*.h5")) else []
    checks = []

    def within(folder: Path) -> bool:  # an artifact under the folder verified, or holding it
        return folder.is_relative_to(path) or path.is_relative_to(folder)

    if within(layout.tiles) and layout.tiles.is_dir():
        checks.append(_guarded(layout.tiles, lambda: _tiles(layout.tiles, layout)))
    for folder in sorted(layout.features.glob("*/")) if layout.features.is_dir() else []:
        folds = sorted(p for p in folder.glob("fold*/") if p.is_dir())
        for sub in folds or [folder]:
            if within(sub):
                checks.append(
                    _guarded(sub, lambda sub=sub, folder=folder: _features(sub, folder.name, layout))
                )
    for mil in layout.mil_results() if layout.mil.is_dir() else []:
        if within(mil.dir):
            checks.append(_guarded(mil.dir, lambda mil=mil: _mil(mil, layout)))
    for history in sorted(layout.finetune.glob("*/fold*/history.json")) if layout.finetune.is_dir() else []:
        if within(history.parent):
            checks.append(_guarded(history.parent, lambda history=history: _finetune(history, layout)))
    for result in layout.cka_results() if layout.cka.is_dir() else []:
        if within(result):
            checks.append(_guarded(result, lambda result=result: _cka(result, layout)))
    for bundle in layout.bundles() if layout.onnx.is_dir() else []:
        if within(bundle):
            checks.append(_guarded(bundle, lambda bundle=bundle: _bundle(bundle, layout)))
    return checks


def _loose(path: Path) -> Finding:
    """A folder outside a study: tiles or features by what its files record (the first that records
    anything readable says which)."""
    for file in sorted(path.glob("*.h5")):
        if read_record(file, "tiles") is not None:
            return _tiles(path, None)
        if read_record(file, "features") is not None:
            return _features(path, path.name, None)
    names = ", ".join(p.name for p in sorted(path.glob("*.h5"))[:3])
    return Finding(
        f"{path}/", "unknown", [f"no file records a readable lineage ({names}, ...)"], "make it again"
    )


# -------------------------------------------------------------------------------------------- checks


def _h5_digest(path: Path, names: Iterable[str], recorded: str) -> str:
    """The digest of an h5 file's datasets now (``recorded`` when only records are compared)."""
    import h5py

    if not _DEEP.get():
        return recorded
    with h5py.File(path, "r") as f:
        return lineage.array_digest(*(f[name][:] for name in names))


def _same_slide(path: str, recorded: dict[str, Any]) -> bool:
    """lineage.same_slide, or only that the file exists when records alone are compared."""
    return lineage.same_slide(path, recorded) if _DEEP.get() else Path(path).is_file()


def _records(folder: Path, kind: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The lineage of each ``*.h5`` in ``folder`` by file stem, and a problem per file without one."""
    found, problems = {}, []
    for path in sorted(folder.glob("*.h5")):
        if (record := read_record(path, kind)) is None:
            problems.append(f"{path.name} {lineage.NO_RECORD}")
        else:
            found[path.stem] = record
    return found, problems


def _manifest_paths(layout: StudyLayout | None) -> dict[str, str]:
    """The study's manifest's slide paths by id (none when it has no readable manifest)."""
    from histotransfer.core.errors import ManifestError
    from histotransfer.io.manifest import read_manifest

    if layout is None or not layout.manifest.is_file():
        return {}
    try:
        return {r.slide_id: r.path for r in read_manifest(layout.manifest)}
    except ManifestError:
        return {}


def _tiles(folder: Path, layout: StudyLayout | None) -> Finding:
    from histotransfer.core.errors import SlideError
    from histotransfer.wsi.tiling import load_tiles

    records, problems = _records(folder, "tiles")
    notes = set()
    listed = _manifest_paths(layout)  # a moved study's slides are where its manifest says
    for slide_id, rec in records.items():
        try:
            if _DEEP.get():
                load_tiles(folder / f"{slide_id}.h5")  # its content is what its lineage recorded
        except SlideError as exc:
            problems.append(str(exc).removeprefix(f"{folder}/"))
        slide = rec["slide"]
        if slide["id"] != slide_id:
            problems.append(f"{slide_id}.h5 holds the tiles of slide {slide['id']!r} (renamed?)")
        path = listed.get(slide_id, slide["path"])
        if str(path).startswith("gs://"):
            notes.add("slides on gs:// are not opened (their tiles' records are checked)")
        elif not Path(path).is_file():
            problems.append(f"{slide_id}: its slide {path} is gone")
        elif not _same_slide(path, slide):
            problems.append(
                f"{slide_id}: the slide {path} is not the one tiled (size, dimensions or quickhash)"
            )
    tilings = sorted({rec["tiling"][:8] for rec in records.values()})
    if len(tilings) > 1:
        problems.append(f"the folder mixes tiles of {len(tilings)} tiling settings ({', '.join(tilings)})")
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
        tiles = {p.stem: r for p in layout.tiles.glob("*.h5") if (r := read_record(p, "tiles")) is not None}
    for slide_id, rec in records.items():
        if _h5_digest(folder / f"{slide_id}.h5", ("features", "coords"), rec["digest"]) != rec["digest"]:
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
    if len({(r["extraction"], r["tiles"]["tiling"]) for r in records.values()}) > 1 or len(weights) > 1:
        problems.append("the folder mixes features of different weights or settings")
    if layout is not None and folder.name.startswith("fold") and encoder_id.endswith("+ft") and weights:
        made = read_record(
            layout.finetune_fold(encoder_id.removesuffix("+ft"), int(folder.name[4:])).history, "finetune"
        )
        if made is None or {made["encoder"]["weights_sha256"]} != {h for _, h in weights}:
            problems.append(f"not made by the encoder {folder.name} of the fine-tuning in the study")
    shown = ", ".join(f"{s} (tensors sha256 {short(h)})" for s, h in sorted(weights)[:2])
    shown = shown or "no weights recorded"
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
        if (record := read_record(folder / f"{slide_id}.h5", "features")) is None:
            return None
        digests[slide_id] = record["digest"]
    return mapping_digest(digests)


def _files_now(folder: Path, recorded: dict[str, str], what: str) -> list[str]:
    from histotransfer.io.provenance import sha256_file

    problems = []
    for name, sha in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is gone")
        elif _DEEP.get() and sha256_file(path) != sha:
            problems.append(f"{name} was changed after {what} wrote it")
    return problems


def _sealed(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A sealed JSON artifact's content, or None and why it cannot be used."""
    from histotransfer.core.errors import ArtifactError
    from histotransfer.io.provenance import DAMAGED, read_json

    redo = "make it again"
    try:
        return read_json(path, redo=redo), None
    except ArtifactError as exc:  # the reason only: the finding names what to redo
        return None, str(exc).removesuffix(f": {DAMAGED}{redo}")


def _slides_of(mil: MILLayout) -> list[str]:
    with mil.predictions.open(newline="", encoding="utf-8") as f:
        return [row["slide_id"] for row in csv.DictReader(f)]


def _mil(mil: MILLayout, layout: StudyLayout) -> Finding:
    name = mil.dir.name
    if name.endswith("+ft"):  # made by fine-tuning: redone by it
        redo = _finetune_again(layout, name.removesuffix("+ft"))
    else:
        redo = f"train again: histotransfer train MANIFEST --features FEATURES/{name} --out {mil.dir.parent}"
        redo += " --overwrite"
    metrics, why = _sealed(mil.metrics)
    if metrics is None or not lineage.well_formed(record := metrics.get("lineage"), "mil"):
        return Finding(str(mil.dir) + "/", "unreadable", [why or f"metrics.json {lineage.NO_RECORD}"], redo)
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
        redo,
        notes,
    )


def _finetune_again(layout: StudyLayout, encoder_id: str) -> str:
    """What remakes the fine-tuning of ``encoder_id`` (its folds, features and MIL)."""
    return (
        f"fine-tune again: histotransfer finetune MANIFEST --study {layout.root} --encoder {encoder_id} "
        "--overwrite"
    )


def _finetune(history: Path, layout: StudyLayout) -> Finding:
    encoder_id, fold = history.parent.parent.name, int(history.parent.name.removeprefix("fold"))
    redo = _finetune_again(layout, encoder_id)
    data, why = _sealed(history)
    record = None if data is None else data.get("lineage")
    if data is None or not lineage.well_formed(record, "finetune"):
        return Finding(
            str(history.parent) + "/", "unreadable", [why or f"history.json {lineage.NO_RECORD}"], redo
        )
    problems = _files_now(history.parent, data.get("files", {}), "fine-tuning")
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
        record = read_record(layout.finetune_fold(base.removesuffix("+ft"), int(fold)).history, "finetune")
        return None if record is None else record["encoder"]["weights_sha256"]
    folder = layout.features_dir(encoder_id)
    record = (
        next((read_record(p, "features") for p in sorted(folder.glob("*.h5"))), None)
        if folder.is_dir()
        else None
    )
    return None if record is None else record["encoder"]["weights_sha256"]


def _cka(path: Path, layout: StudyLayout) -> Finding:
    redo = f"compare again: histotransfer cka MANIFEST --study {layout.root} --encoder ENCODER"
    data, why = _sealed(path)
    record = None if data is None else data.get("lineage")
    if data is None or not lineage.well_formed(record, "cka"):
        return Finding(str(path), "unreadable", [why or f"{path.name} {lineage.NO_RECORD}"], redo)
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
        tiles = read_record(layout.tiles_file(slide_id), "tiles")
        if tiles is None or tiles["digest"] != digest:
            problems.append(f"the tiles of {slide_id} it sampled changed or are gone")
    made = f"{record['a']['id']} vs {record['b']['id']} on tiles of {len(record['tiles'])} slide(s)"
    return Finding(str(path), made, problems, redo, notes)


def _bundle(folder: Path, layout: StudyLayout | None) -> Finding:
    from histotransfer.deploy.bundle import read_spec, verify_files

    redo = f"export again: histotransfer export --mil MIL_RESULT --out {folder} --overwrite"
    try:
        spec = read_spec(folder)
        if _DEEP.get():
            verify_files(folder, spec)
    except BundleError as exc:
        return Finding(str(folder) + "/", "unreadable", [str(exc)], redo)
    record, problems, notes = spec.lineage, [], []
    made = (
        f"{spec.encoder.id} ({spec.encoder.weights_source}) with the {spec.aggregator.kind} MIL head of fold "
        f"{spec.aggregator.fold}"
    )
    if not lineage.well_formed(record, "bundle"):
        return Finding(str(folder) + "/", made, [], redo, ["records no lineage (made outside a study)"])
    mil = record["mil"]
    candidates = [layout.mil_result(mil["encoder_id"]).dir] if layout is not None else []
    source = next((d for d in [*candidates, Path(mil["dir"])] if (d / "metrics.json").is_file()), None)
    if source is None:
        notes.append(f"its MIL result {mil['dir']} is not here: the head and weights are not compared")
    else:
        head = {f"fold{mil['fold']}/model.pt": mil["head"]}
        problems += [f"its MIL result: {p}" for p in _files_now(source, head, "MIL")]
        trained = read_record(MILLayout(source).metrics, "mil")
        recorded = {} if trained is None else lineage.of_fold(trained["encoder"], mil["fold"]) or {}
        if recorded.get("weights_sha256") != record["encoder"]["weights_sha256"]:
            problems.append(f"its encoder's weights are not those {source} was trained on")
    return Finding(str(folder) + "/", made, problems, redo, notes)


def _predictions(out: PredictionLayout) -> Finding:
    from histotransfer.deploy.bundle import read_spec
    from histotransfer.deploy.inference import read_slide_prediction

    records, problems = _records(out.dir / "slides", "prediction")
    notes, bundles = set(), {}
    table = _table(out.table)
    for slide_id, rec in records.items():
        path = out.slide(slide_id)
        if _h5_digest(path, ("probabilities", "attention", "coords"), rec["digest"]) != rec["digest"]:
            problems.append(f"slides/{slide_id}.h5 was changed after it was predicted")
        elif (row := table.get(slide_id)) is None or any(
            str(row.get(k)) != str(v) for k, v in read_slide_prediction(path).items() if k != "n_tiles"
        ):
            problems.append(f"predictions.csv does not say what slides/{slide_id}.h5 holds (edited?)")
        bundle = Path(rec["bundle"]["path"])
        if bundle not in bundles:
            try:
                bundles[bundle] = read_spec(bundle).integrity
            except BundleError:
                bundles[bundle] = None
        if bundles[bundle] is None:
            notes.add(f"the bundle {bundle} is not here (or not readable): not compared")
        elif bundles[bundle] != rec["bundle"]["integrity"]:
            problems.append(f"{slide_id}: predicted by another export of {bundle} than the one there now")
        slide = rec["slide"]
        if str(slide.get("path", "")).startswith("gs://"):
            notes.add("slides on gs:// are not opened")
        elif not _same_slide(slide["path"], slide):
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


def _table(path: Path) -> dict[str, dict[str, str]]:
    """predictions.csv's rows of finished slides, by slide id."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f) if row.get("status") != "failed"}


def check(path: str | Path) -> Verification:
    """verify(path, deep=False), as the report uses it: the records of every artifact compared (cheap at
    any scale); never raises for a study it cannot read."""
    try:
        return verify(path, deep=False)
    except (LayoutError, LineageError, OSError, ValueError, csv.Error) as exc:
        return Verification(Path(path), [Finding(str(path), "not verifiable", [str(exc)])])
