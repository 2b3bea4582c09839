"""Exceptions the runtime raises for user mistakes; each message says how to fix it."""

from __future__ import annotations


class MisconfigurationError(ValueError):
    """The module, its hooks or the loop settings do not fit together."""


class StepOutputError(TypeError):
    """A step hook returned something the loop cannot use."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite and the run was asked to fail fast."""


class WorldSizeChangedError(MisconfigurationError):
    """A checkpoint saved mid-epoch is resumed on a different number of ranks."""


class DistributedSkipError(RuntimeError):
    """training_step returned None (skip this step) on a step that all-reduces gradients across ranks."""
