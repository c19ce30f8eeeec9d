"""The models a stage runs: an encoder built with its weights (an explicit file wins, else the config's,
else its default) and the extraction engine (its device checked before any folder is made)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from histotransfer.core.config import StudyConfig

if TYPE_CHECKING:
    from histotransfer.features.encoders import Encoder
    from histotransfer.features.extraction import EngineSettings


def weights_for(config: StudyConfig, encoder_id: str, weights: str | Path | None = None) -> str | Path | None:
    """An encoder's weights: the ones given, else the ones the config lists for it (e.g. a tagged id
    such as ``densenet121+kimianet`` whose checkpoint only params.yaml names), else its default."""
    return weights if weights else config.extraction.weights_for(encoder_id)


def engine(config: StudyConfig) -> EngineSettings:
    """The extraction engine the config asks for, its device checked: call before building models."""
    from histotransfer.features.extraction import settings_from

    return settings_from(config.extraction)


def build(config: StudyConfig, encoder_id: str, weights: str | Path | None = None) -> Encoder:
    from histotransfer.features.encoders import build_encoder

    return build_encoder(encoder_id, weights=weights_for(config, encoder_id, weights))
