"""What the trainer is doing right now (Lightning's ``trainer.state``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TrainerFn(str, Enum):
    """The user-facing entry point that is running."""

    FITTING = "fit"
    VALIDATING = "validate"
    TESTING = "test"
    PREDICTING = "predict"


class RunningStage(str, Enum):
    """The loop that is running inside the entry point."""

    TRAINING = "train"
    SANITY_CHECKING = "sanity_check"
    VALIDATING = "validate"
    TESTING = "test"
    PREDICTING = "predict"


@dataclass
class TrainerState:
    fn: TrainerFn | None = None
    stage: RunningStage | None = None
    status: str = "initializing"  # "running", "finished", "interrupted", "failed"
