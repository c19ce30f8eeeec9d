"""The study's stages, one module each, and the only way in: `histotransfer run` (``run``), every CLI
subcommand, the KFP components and DVC (through the CLI and ``adapter``) call these and nothing below.

A stage takes a StudyLayout (where things are), the validated StudyConfig (how to do them) and the
cohort's records, and owns everything in between: its checks (the output it claims, the inputs it
verifies), which weights an encoder id gets (an explicit file wins, else the config's), which device,
which slides go on (those an earlier stage did not record as failed in its summary), resuming (current
outputs are reused unless ``overwrite``) and where its summary goes.

Slide-parallel stages (tile, extract) return a StageResult and never raise for one bad slide; the
others raise the library's errors (FeaturesError, SplitError, TrainingError, WeightsError, ...).
Stages that fan out over encoders share one failure rule (``fanout``).
"""

from histotransfer.stages.cka import cka, compare_encoders
from histotransfer.stages.cohort import cohort, sample_cohort
from histotransfer.stages.export import best_mil_result, export
from histotransfer.stages.extract import Extracted, extract
from histotransfer.stages.finetune import finetune
from histotransfer.stages.models import build, engine
from histotransfer.stages.predict import predict
from histotransfer.stages.report import report
from histotransfer.stages.run import StudyOutputs, run_study
from histotransfer.stages.tile import tile
from histotransfer.stages.train import train

# the study's stages in the order they run (DVC's stages and the KFP pipeline follow it)
ORDER = ("cohort", "tile", "extract", "train", "finetune", "cka", "export", "report")

__all__ = [
    "ORDER",
    "Extracted",
    "StudyOutputs",
    "best_mil_result",
    "build",
    "cka",
    "cohort",
    "compare_encoders",
    "engine",
    "export",
    "extract",
    "finetune",
    "predict",
    "report",
    "run_study",
    "sample_cohort",
    "tile",
    "train",
]
