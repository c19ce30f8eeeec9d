"""A cohort's feature bags for MIL: validated once up front, cached in memory within a budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from histotransfer.core.errors import FeaturesError
from histotransfer.io import lineage
from histotransfer.io.layout import slide_file
from histotransfer.io.manifest import SlideRecord


@dataclass(frozen=True)
class BagInfo:
    slide_id: str
    path: Path
    n_tiles: int
    label_index: int


class BagStore:
    """Features per slide, checked for presence, shape, dimension and alignment before training."""

    def __init__(
        self,
        records: Sequence[SlideRecord],
        features_dir: Path,
        *,
        classes: Sequence[str],
        cache_gb: float = 4.0,
    ):
        self.features_dir = Path(features_dir)
        self.classes = list(classes)
        self.bags: dict[str, BagInfo] = {}
        self.dim: int | None = None
        self.encoder_id = ""
        problems = []
        for record in records:
            try:
                self.bags[record.slide_id] = self._check(record)
            except FeaturesError as exc:
                problems.append(str(exc))
        if problems:
            raise FeaturesError(f"{len(problems)} feature file problem(s):\n  " + "\n  ".join(problems))
        self._cache: dict[str, torch.Tensor] = {}
        self._verified: set[str] = set()
        self._budget = int(cache_gb * 2**30)

    def _check(self, record: SlideRecord) -> BagInfo:
        path = slide_file(self.features_dir, record.slide_id)
        if not path.is_file():
            raise FeaturesError(
                f"{record.slide_id}: no features file {path} (run `histotransfer extract`, or drop the slide "
                "from the manifest if its extraction failed)"
            )
        try:
            with h5py.File(path, "r") as f:
                shapes = {name: f[name].shape for name in ("features", "coords") if name in f}
                self.encoder_id = self.encoder_id or str(f.attrs.get("encoder_id", ""))
        except OSError as exc:
            raise FeaturesError(f"{path}: not a readable h5 file ({exc}); extract this slide again") from exc
        if len(shapes) < 2:
            raise FeaturesError(f"{path}: not a features file (needs datasets `features` and `coords`)")
        if len(shapes["features"]) != 2:
            raise FeaturesError(f"{path}: `features` has shape {shapes['features']}, not (n_tiles, dim)")
        n, dim = shapes["features"]
        if shapes["coords"] != (n, 2):
            raise FeaturesError(f"{path}: {n} feature rows but coords of shape {shapes['coords']}")
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise FeaturesError(
                f"{path}: features are {dim}-d, other slides' are {self.dim}-d (mixed encoders?)"
            )
        if n == 0:
            raise FeaturesError(f"{path}: the bag is empty")
        if record.label not in self.classes:
            raise FeaturesError(f"{record.slide_id}: label {record.label!r} is not one of {self.classes}")
        return BagInfo(record.slide_id, path, n, self.classes.index(record.label))

    def features(self, slide_id: str) -> torch.Tensor:
        """(n_tiles, dim) float32 features of a slide."""
        if slide_id in self._cache:
            return self._cache[slide_id]
        path = self.bags[slide_id].path
        with h5py.File(path, "r") as f:
            stored = f["features"][:]  # (n_tiles, dim)
            if slide_id not in self._verified:  # the content its lineage recorded, read once
                made = lineage.parse_attr(f.attrs.get(lineage.LINEAGE), "features")
                if made is not None and lineage.array_digest(stored, f["coords"][:]) != made["digest"]:
                    raise FeaturesError(
                        f"{path} was changed after extraction (its content is not what its lineage "
                        "recorded): move it away and extract this slide again"
                    )
                self._verified.add(slide_id)
        x = torch.from_numpy(stored.astype(np.float32))
        if not torch.isfinite(x).all():
            raise FeaturesError(f"{self.bags[slide_id].path}: non-finite feature values")
        if self._budget >= x.numel() * 4:
            self._cache[slide_id] = x
            self._budget -= x.numel() * 4
        return x

    def coords(self, slide_id: str) -> np.ndarray:
        with h5py.File(self.bags[slide_id].path, "r") as f:
            return f["coords"][:]

    def label(self, slide_id: str) -> int:
        return self.bags[slide_id].label_index
