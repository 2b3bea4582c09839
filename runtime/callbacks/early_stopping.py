"""EarlyStopping: stop ``fit`` when a monitored metric stops improving."""

from __future__ import annotations

import logging
import warnings
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from runtime.callbacks.base import Callback
from runtime.errors import MisconfigurationError
from runtime.state import TrainerFn

log = logging.getLogger(__name__)


class EarlyStoppingReason(Enum):
    """Why :class:`EarlyStopping` asked the trainer to stop."""

    NOT_STOPPED = 0
    STOPPING_THRESHOLD = 1
    DIVERGENCE_THRESHOLD = 2
    PATIENCE_EXHAUSTED = 3
    NON_FINITE_METRIC = 4


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved for ``patience`` checks.

    A check runs at the end of each training epoch when validation runs once
    per epoch (``val_check_interval == 1.0`` and ``check_val_every_n_epoch == 1``),
    otherwise at the end of each validation pass (``on_validation_end``);
    ``check_on_train_epoch_end`` forces one or the other. No check runs during
    the sanity check, with ``fast_dev_run``, or outside ``fit``.

    Args:
        monitor: metric in ``trainer.callback_metrics`` to watch.
        min_delta: an improvement must be larger than this to count.
        patience: checks without improvement before stopping (validation
            checks, not epochs).
        mode: ``"min"`` or ``"max"``: which direction is an improvement.
        strict: raise if ``monitor`` is missing; with ``False`` the check is skipped.
        check_finite: stop as soon as the metric is NaN or infinite.
        stopping_threshold: stop once the metric is better than this.
        divergence_threshold: stop once the metric is worse than this.
        log_rank_zero_only: with ``verbose``, log only on global rank 0.

    After stopping, ``stopped_epoch``, ``stopping_reason`` and
    ``stopping_reason_message`` say when and why.
    """

    mode_dict = {"min": torch.lt, "max": torch.gt}
    order_dict = {"min": "<", "max": ">"}

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        if mode not in self.mode_dict:
            raise MisconfigurationError(f"EarlyStopping(mode={mode!r}) is invalid: use 'min' or 'max'.")
        self.monitor = monitor
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.log_rank_zero_only = log_rank_zero_only
        self._check_on_train_epoch_end = check_on_train_epoch_end
        # Signed so that "current - min_delta better than best" works for both modes.
        self.min_delta = min_delta if mode == "max" else -min_delta
        self.wait_count = 0
        self.stopped_epoch = 0
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self.best_score: Tensor = torch.tensor(float("inf") if mode == "min" else float("-inf"))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def monitor_op(self):
        return self.mode_dict[self.mode]

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Decide where the check runs, from the trainer's validation schedule."""
        if self._check_on_train_epoch_end is None:
            self._check_on_train_epoch_end = (
                trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Check here when validation runs once per epoch (or when asked to)."""
        if self._checks_on_train_epoch_end(trainer) and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Check here when validation does not line up with training epochs."""
        if not self._checks_on_train_epoch_end(trainer) and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "best_score": self.best_score,
            "patience": self.patience,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = state_dict["best_score"]
        self.patience = state_dict["patience"]
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value)
        )
        self.stopping_reason_message = state_dict.get("stopping_reason_message")

    # -- the check

    def _checks_on_train_epoch_end(self, trainer) -> bool:
        if self._check_on_train_epoch_end is None:  # setup was not called: decide now
            return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
        return self._check_on_train_epoch_end

    @staticmethod
    def _should_skip_check(trainer) -> bool:
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _validate_condition_metric(self, metrics: dict[str, Any]) -> bool:
        if self.monitor in metrics:
            return True
        message = (
            f"EarlyStopping(monitor={self.monitor!r}) found no metric named {self.monitor!r} in "
            f"trainer.callback_metrics. Available metrics: {sorted(metrics)}. Log it with "
            f"self.log({self.monitor!r}, value), set monitor to one of the available names, or pass "
            "strict=False to skip the check while the metric is missing."
        )
        if self.strict:
            raise RuntimeError(message)
        if self.verbose:
            warnings.warn(message, RuntimeWarning, stacklevel=2)  # once, not at every check
        return False

    def _run_early_stopping_check(self, trainer) -> None:
        metrics = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(metrics):
            return
        value = metrics[self.monitor]
        current = (value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))).squeeze().cpu()
        should_stop, reason = self._evaluate_stopping_criteria(current)
        # One rank's decision to stop stops them all, so no rank is left waiting in a collective.
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and self.verbose and (trainer.is_global_zero or not self.log_rank_zero_only):
            log.info(reason)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        better = self.monitor_op
        sign = self.order_dict[self.mode]
        if self.check_finite and not torch.isfinite(current):
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            return True, (
                f"Monitored metric {self.monitor} = {current.item()} is not finite; the best value so far was "
                f"{self.best_score.item():.3f}. Stopping training."
            )
        if self.stopping_threshold is not None and better(current, self.stopping_threshold):
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            return True, (
                f"Stopping threshold reached: {self.monitor} = {current.item()} {sign} {self.stopping_threshold}. "
                "Stopping training."
            )
        if self.divergence_threshold is not None and better(-current, -self.divergence_threshold):
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            return True, (
                f"Divergence threshold reached: {self.monitor} = {current.item()} {sign} "
                f"{self.divergence_threshold}. Stopping training."
            )
        if better(current - self.min_delta, self.best_score):
            message = self._improvement_message(current)
            self.best_score = current.clone()
            self.wait_count = 0
            return False, message
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            return True, (
                f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} checks; best "
                f"score {self.best_score.item():.3f}. Stopping training."
            )
        return False, None

    def _improvement_message(self, current: Tensor) -> str:
        if torch.isfinite(self.best_score):
            return (
                f"Metric {self.monitor} improved by {abs(self.best_score.item() - current.item()):.3f} >= "
                f"min_delta = {abs(self.min_delta)}. New best score: {current.item():.3f}"
            )
        return f"Metric {self.monitor} improved. New best score: {current.item():.3f}"
