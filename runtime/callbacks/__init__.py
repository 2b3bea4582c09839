"""Callbacks: the base class and the built-in ones (checkpointing, early stopping, LR logging, prediction writing)."""

from runtime.callbacks.base import Callback
from runtime.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from runtime.callbacks.lr_monitor import LearningRateMonitor
from runtime.callbacks.model_checkpoint import ModelCheckpoint
from runtime.callbacks.prediction_writer import BasePredictionWriter

__all__ = [
    "BasePredictionWriter",
    "Callback",
    "EarlyStopping",
    "EarlyStoppingReason",
    "LearningRateMonitor",
    "ModelCheckpoint",
]
