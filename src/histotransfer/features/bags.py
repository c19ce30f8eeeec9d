"""A cohort's feature bags for MIL: validated once up front, cached in memory within a budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from histotransfer.errors import FeaturesError
from histotransfer.layout import slide_file
from histotransfer.manifest import SlideRecord


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
        tiles_dir: Path | None = None,
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
                self.bags[record.slide_id] = self._check(record, tiles_dir)
            except FeaturesError as exc:
                problems.append(str(exc))
        if problems:
            raise FeaturesError(f"{len(problems)} feature file problem(s):\n  " + "\n  ".join(problems))
        self._cache: dict[str, torch.Tensor] = {}
        self._budget = int(cache_gb * 2**30)

    def _check(self, record: SlideRecord, tiles_dir: Path | None) -> BagInfo:
        path = slide_file(self.features_dir, record.slide_id)
        if not path.is_file():
            raise FeaturesError(
                f"{record.slide_id}: no features file {path} (run `histotransfer extract`, or drop the slide "
                "from the manifest if its extraction failed)"
            )
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise FeaturesError(f"{path}: not a features file (needs datasets `features` and `coords`)")
            n, dim = f["features"].shape
            if f["coords"].shape != (n, 2):
                raise FeaturesError(f"{path}: {n} feature rows but coords of shape {f['coords'].shape}")
            if self.dim is None:
                self.dim, self.encoder_id = dim, str(f.attrs.get("encoder_id", ""))
            elif dim != self.dim:
                raise FeaturesError(
                    f"{path}: features are {dim}-d, other slides' are {self.dim}-d (mixed encoders?)"
                )
            if n == 0:
                raise FeaturesError(f"{path}: the bag is empty")
            if tiles_dir is not None:
                tiles_path = slide_file(tiles_dir, record.slide_id)
                if not tiles_path.is_file():
                    raise FeaturesError(
                        f"{record.slide_id}: no tiles file {tiles_path} to check the coords against"
                    )
                with h5py.File(tiles_path, "r") as t:
                    if not np.array_equal(t["coords"][:], f["coords"][:]):
                        raise FeaturesError(
                            f"{path}: coords are not those of {tiles_path} (tiles changed after extraction? "
                            "re-run `histotransfer extract`)"
                        )
        if record.label not in self.classes:
            raise FeaturesError(f"{record.slide_id}: label {record.label!r} is not one of {self.classes}")
        return BagInfo(record.slide_id, path, n, self.classes.index(record.label))

    def features(self, slide_id: str) -> torch.Tensor:
        """(n_tiles, dim) float32 features of a slide."""
        if slide_id in self._cache:
            return self._cache[slide_id]
        with h5py.File(self.bags[slide_id].path, "r") as f:
            x = torch.from_numpy(f["features"][:].astype(np.float32))  # (n_tiles, dim)
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
