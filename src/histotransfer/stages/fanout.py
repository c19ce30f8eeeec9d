"""One failure rule for work that fans out over encoders (MIL, fine-tuning, CKA), used by `histotransfer
run`, the KFP components and DVC alike: an encoder whose stage fails is logged and recorded, and the
others go on; only when every one failed is the stage itself a failure."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from histotransfer.core import errors

log = logging.getLogger(__name__)
T = TypeVar("T")

# what one encoder's stage can fail with while the others go on (its inputs, its folder, its training)
STAGE_ERRORS = (
    errors.ArtifactError,
    errors.ExportError,
    errors.FeaturesError,
    errors.LineageError,
    errors.OutputError,
    errors.SplitError,
    errors.TrainingError,
    errors.WeightsError,
)


@dataclass
class FanOut(Generic[T]):
    results: dict[str, T] = field(default_factory=dict)  # item -> what its stage returned, in order
    errors: dict[str, str] = field(default_factory=dict)  # "item (what)" -> why it failed
    first: Exception | None = None  # the first failure itself

    def record(self, key: str, exc: Exception) -> None:
        log.error("%s failed: %s", key, exc)
        self.errors[key] = f"{type(exc).__name__}: {exc}"
        self.first = self.first or exc

    def check(self) -> FanOut[T]:
        """Raise when there was work and none of it finished (an orchestrator's step then fails);
        otherwise the failures stay recorded beside what finished."""
        if self.errors and not self.results:
            raise errors.FanOutError("; ".join(f"{k}: {v}" for k, v in self.errors.items()))
        return self


def fan_out(items: Iterable[str], stage: Callable[[str], T], *, what: str) -> FanOut[T]:
    """``stage(item)`` for every item; a failure (STAGE_ERRORS) is recorded as ``"item (what)"``."""
    done: FanOut[T] = FanOut()
    for item in items:
        try:
            done.results[item] = stage(item)
        except STAGE_ERRORS as exc:
            done.record(f"{item} ({what})", exc)
    return done
