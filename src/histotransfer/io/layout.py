"""Where every file of a study lives: the data contract's paths, decided in this module only.

A study root holds one folder per section::

    cohort/      manifest.csv, cohort.json, slides/, masks/, artefacts/   (the sample cohort)
    tiles/       {slide_id}.h5, {slide_id}.png, summary.csv
    features/    {encoder_id}/{slide_id}.h5 and summary.csv; fine-tuned: {encoder_id}+ft/fold{k}/...
    mil/         {encoder_id}/  (see MILLayout); mil.compare: {encoder_id}/aggregators/{head}/{encoder_id}/
    finetune/    {encoder_id}/fold{k}/  (see FinetuneFoldLayout)
    cka/         {a}__{b}.json and .png
    onnx/        {name}/  (an ONNX bundle)
    report/      index.html, summary.md, figures/
    metrics.json, plots/   (DVC's tracking files)

A command that works on one section (``histotransfer tile --out DIR``) uses a layout whose other
sections it never touches; a study on gs:// is laid out in its local staging folder, then uploaded.
Every file name made from a slide id goes through ``slide_file``, which refuses unsafe ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from histotransfer.core.errors import LayoutError
from histotransfer.io.manifest import check_slide_id

SECTIONS = ("cohort", "tiles", "features", "mil", "finetune", "cka", "onnx", "report")
SUMMARY = "summary.csv"
MANIFEST = "manifest.csv"
COHORT_META = "cohort.json"  # the sample cohort's plan; its lesion masks lie in masks/ beside it
BUNDLE_SPEC = "bundle.json"  # written last into an ONNX bundle folder (histotransfer.deploy.bundle)
MODEL_FILE, HISTORY_FILE = "model.pt", "history.json"  # a MIL fold's head and its record


def slide_file(folder: str | Path, slide_id: str, suffix: str = ".h5") -> Path:
    """``{folder}/{slide_id}{suffix}``: the one way a slide's file is named (the id is checked)."""
    if why := check_slide_id(slide_id):
        raise ValueError(why)
    return Path(folder) / f"{slide_id}{suffix}"


def shard_summary(folder: str | Path, shard: int) -> Path:
    """The summary a shard of a slide-parallel stage writes (merged into ``summary.csv`` later)."""
    return Path(folder) / f"summary-shard{int(shard)}.csv"


def is_shard_summary(path: str | Path) -> bool:
    path = Path(path)
    return path.name.startswith("summary-shard") and path.suffix == ".csv"


def fold_name(fold: int) -> str:
    return f"fold{int(fold)}"


@dataclass(frozen=True)
class CohortLayout:
    """The sample cohort's folder: ``manifest.csv``, ``cohort.json`` (its plan, written last),
    ``slides/{slide_id}.svs``, and the ground-truth ``masks/`` (lesions) and ``artefacts/`` as PNGs."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    @property
    def meta(self) -> Path:
        return self.dir / COHORT_META

    @property
    def masks(self) -> Path:
        return self.dir / "masks"

    def slide(self, slide_id: str) -> Path:
        return slide_file(self.dir / "slides", slide_id, ".svs")

    def lesion_mask(self, slide_id: str) -> Path:
        return slide_file(self.masks, slide_id, ".png")

    def artefact_mask(self, slide_id: str) -> Path:
        return slide_file(self.dir / "artefacts", slide_id, ".png")


@dataclass(frozen=True)
class MILLayout:
    """One cross-validated MIL result: ``mil/{encoder_id}/``."""

    dir: Path

    @classmethod
    def of(cls, mil_root: str | Path, encoder_id: str) -> MILLayout:
        return cls(Path(mil_root) / _component(encoder_id))

    @classmethod
    def finished(cls, mil_root: str | Path) -> list[MILLayout]:
        """Every finished MIL result under a mil folder, by encoder id."""
        return [cls(p.parent) for p in sorted(Path(mil_root).glob("*/metrics.json"))]

    @property
    def metrics(self) -> Path:  # written last: its presence marks a finished result
        return self.dir / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.dir / "predictions.csv"

    @property
    def site_predictions(self) -> Path:  # evaluation.cv: site: the out-of-site predictions
        return self.dir / "predictions_by_site.csv"

    @property
    def roc(self) -> Path:
        return self.dir / "roc.png"

    def fold_dir(self, fold: int) -> Path:
        return self.dir / fold_name(fold)

    def fold_model(self, fold: int) -> Path:
        return self.fold_dir(fold) / MODEL_FILE

    def fold_history(self, fold: int) -> Path:
        return self.fold_dir(fold) / HISTORY_FILE

    def folds(self) -> list[int]:
        """The folds that have a history, in order."""
        found = (p.parent.name.removeprefix("fold") for p in self.dir.glob("fold*/history.json"))
        return sorted(int(k) for k in found if k.isdigit())

    def attention(self, slide_id: str) -> Path:
        return slide_file(self.dir / "attention", slide_id)

    def compared_root(self, aggregator: str) -> Path:
        """Where mil.compare's run with ``aggregator`` writes its result (``{root}/{encoder_id}/``):
        inside this one, so that it travels with it (a KFP artifact, a DVC output)."""
        return self.dir / "aggregators" / aggregator

    def compared(self) -> list[MILLayout]:
        """The finished results of mil.compare's other heads on the same features."""
        return [MILLayout(p.parent) for p in sorted(self.dir.glob("aggregators/*/*/metrics.json"))]

    def heatmap(self, slide_id: str) -> Path:
        return slide_file(self.dir / "heatmaps", slide_id, ".png")

    @property
    def heatmaps(self) -> Path:
        return self.dir / "heatmaps"


@dataclass(frozen=True)
class FinetuneFoldLayout:
    """One fold's fine-tuning: ``finetune/{encoder_id}/fold{k}/``."""

    dir: Path

    @property
    def encoder(self) -> Path:  # loads as the fine-tuned id ({encoder_id}+ft)
        return self.dir / "encoder.pt"

    @property
    def head(self) -> Path:
        return self.dir / "head.pt"

    @property
    def selection(self) -> Path:
        return self.dir / "selection.h5"

    @property
    def history(self) -> Path:  # written last
        return self.dir / "history.json"


@dataclass(frozen=True)
class StudyLayout:
    """Every path of one study. ``at(root)`` lays every section out under one folder; ``of(...)`` is
    a layout of only the folders a single command is given (``histotransfer tile --out DIR``), and
    asking it for another section is an error naming the section; ``replace`` points sections
    elsewhere."""

    folders: dict[str, Path]  # section -> its folder
    manifest_file: Path | None = None  # a user's manifest (default: cohort/manifest.csv)
    root: Path | None = None  # the study folder, for a layout made by ``at``

    @classmethod
    def at(cls, root: str | Path, *, manifest: str | Path | None = None) -> StudyLayout:
        root = Path(root)
        return cls({name: root / name for name in SECTIONS}, _path(manifest), root)

    @classmethod
    def of(cls, *, manifest: str | Path | None = None, **sections: str | Path | None) -> StudyLayout:
        return cls({}, _path(manifest)).replace(**sections)

    @classmethod
    def of_mil_result(cls, mil_dir: str | Path, *, manifest: str | Path | None = None) -> StudyLayout:
        """The study a MIL result folder belongs to (``{study}/mil/{encoder_id}``)."""
        return cls.at(Path(mil_dir).parent.parent, manifest=manifest)

    def replace(self, *, manifest: str | Path | None = None, **sections: str | Path | None) -> StudyLayout:
        """This layout with some sections (or the manifest) elsewhere; None keeps one as it is."""
        if unknown := sorted(set(sections) - set(SECTIONS)):
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
        folders = self.folders | {k: Path(v) for k, v in sections.items() if v is not None}
        return dataclasses.replace(self, folders=folders, manifest_file=_path(manifest) or self.manifest_file)

    def has(self, section: str) -> bool:
        return section in self.folders or (section == "cohort" and self.manifest_file is not None)

    def _section(self, name: str) -> Path:
        try:
            return self.folders[name]
        except KeyError:
            raise LayoutError(f"this command was given no {name} folder, and it needs one") from None

    @property
    def tiles(self) -> Path:
        return self._section("tiles")

    @property
    def features(self) -> Path:
        return self._section("features")

    @property
    def mil(self) -> Path:
        return self._section("mil")

    @property
    def finetune(self) -> Path:
        return self._section("finetune")

    @property
    def cka(self) -> Path:
        return self._section("cka")

    @property
    def onnx(self) -> Path:
        return self._section("onnx")

    @property
    def report(self) -> Path:
        return self._section("report")

    @property
    def manifest(self) -> Path:
        return self.manifest_file if self.manifest_file is not None else self._section("cohort") / MANIFEST

    # ------------------------------------------------------------------------------------- cohort
    @property
    def cohort(self) -> Path:
        """The cohort's folder: the manifest's (the sample cohort is built there)."""
        return self.manifest.parent

    @property
    def cohort_files(self) -> CohortLayout:
        """The sample cohort's files beside the manifest (a user's cohort has only its manifest)."""
        return CohortLayout(self.cohort)

    # -------------------------------------------------------------------------------------- tiles
    def tiles_file(self, slide_id: str) -> Path:
        return slide_file(self.tiles, slide_id)

    def tiles_qc(self, slide_id: str) -> Path:
        return slide_file(self.tiles, slide_id, ".png")

    # ----------------------------------------------------------------------------------- features
    def features_dir(self, encoder_id: str, fold: int | None = None) -> Path:
        """``features/{encoder_id}/``, or fold ``fold``'s folder of a per-fold (fine-tuned) encoder."""
        folder = self.features / _component(encoder_id)
        return folder if fold is None else folder / fold_name(fold)

    def features_file(self, encoder_id: str, slide_id: str, fold: int | None = None) -> Path:
        return slide_file(self.features_dir(encoder_id, fold), slide_id)

    # ---------------------------------------------------------------------------------------- mil
    def mil_result(self, encoder_id: str) -> MILLayout:
        return MILLayout.of(self.mil, encoder_id)

    def mil_results(self) -> list[MILLayout]:
        """Every finished MIL result of the study, by encoder id."""
        return MILLayout.finished(self.mil)

    # ----------------------------------------------------------------------------------- finetune
    def finetune_dir(self, encoder_id: str) -> Path:
        """``finetune/{encoder_id}/``: every fold's fine-tuning of the frozen ``encoder_id``."""
        return self.finetune / _component(encoder_id)

    def finetune_fold(self, encoder_id: str, fold: int) -> FinetuneFoldLayout:
        """Fold ``fold``'s fine-tuning of the frozen ``encoder_id``."""
        return FinetuneFoldLayout(self.finetune_dir(encoder_id) / fold_name(fold))

    # ---------------------------------------------------------------------------------------- cka
    def cka_files(self, name_a: str, name_b: str) -> tuple[Path, Path]:
        """(``{a}__{b}.json``, ``{a}__{b}.png``) of one comparison."""
        stem = f"{_component(name_a)}__{_component(name_b)}"
        return self.cka / f"{stem}.json", self.cka / f"{stem}.png"

    def cka_results(self) -> list[Path]:
        return sorted(self.cka.glob("*.json"))

    # --------------------------------------------------------------------------------- onnx, report
    def bundle(self, name: str) -> Path:
        return self.onnx / _component(name)

    def bundles(self) -> list[Path]:
        """The finished bundles of the study (``onnx/{name}/`` holding its bundle.json)."""
        return sorted(p.parent for p in self.onnx.glob(f"*/{BUNDLE_SPEC}"))

    @property
    def report_index(self) -> Path:
        return self.report / "index.html"

    @property
    def report_summary(self) -> Path:
        return self.report / "summary.md"

    @property
    def report_figures(self) -> Path:
        return self.report / "figures"

    # the flat metrics and plots DVC tracks (`dvc metrics show`, `dvc plots show`), beside the report
    @property
    def tracking_metrics(self) -> Path:
        return self.report.parent / "metrics.json"

    @property
    def tracking_plots(self) -> Path:
        return self.report.parent / "plots"


@dataclass(frozen=True)
class PredictionLayout:
    """What `histotransfer predict` writes under ``--out``: ``predictions.csv`` (one row per slide),
    ``slides/{slide_id}.h5`` (probabilities, attention, coords), ``heatmaps/`` and ``tiles/``."""

    dir: Path

    @property
    def table(self) -> Path:
        return self.dir / "predictions.csv"

    @property
    def tiles(self) -> Path:
        return self.dir / "tiles"

    def slide(self, slide_id: str) -> Path:
        return slide_file(self.dir / "slides", slide_id)

    def heatmap(self, slide_id: str) -> Path:
        return slide_file(self.dir / "heatmaps", slide_id, ".png")


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _component(name: str) -> str:
    """A name used as one path component (encoder ids, bundle names): no separators, no '..'."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{name!r} cannot name a folder of the study")
    return name
