"""LearningRateMonitor: log each optimizer's learning rate (and optionally momentum, weight decay)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from torch.optim import Optimizer

from runtime.callbacks.base import Callback
from runtime.errors import MisconfigurationError


class LearningRateMonitor(Callback):
    """Log learning rates to the trainer's loggers during ``fit``.

    Names: ``lr-<OptimizerClass>``, or the ``name`` given in the scheduler
    config; ``-1``, ``-2``, ... tell apart further optimizers of the same
    class; ``/pg1``, ``/pg2``, ... (or a param group's own ``"name"``) tell
    apart param groups. Momentum and weight decay use the same name plus
    ``-momentum`` / ``-weight_decay``.

    When: with ``logging_interval=None``, a scheduler's rate is logged on its
    own schedule -- before each logged training batch (``on_train_batch_start``)
    for ``interval="step"``, at each epoch start (``on_train_epoch_start``) for
    ``interval="epoch"``. ``"step"`` or ``"epoch"`` log every scheduler at that
    point instead. Optimizers without a scheduler are logged at both points.
    Values go to ``trainer.log_metrics`` at the logger step and into
    ``trainer.callback_metrics``; ``lrs`` keeps their history.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False, log_weight_decay: bool = False):
        if logging_interval not in (None, "step", "epoch"):
            raise MisconfigurationError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is invalid: use 'step', 'epoch' or None."
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay
        self.lrs: dict[str, list[float]] = {}
        self.last_momentum_values: dict[str, float | None] = {}
        self.last_weight_decay_values: dict[str, float | None] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        """Check that there is somewhere to log to, and fix the names of every rate."""
        if not trainer.loggers:
            raise MisconfigurationError(
                "LearningRateMonitor needs a logger, but the Trainer has none: pass one, e.g. "
                "Trainer(logger=TensorBoardLogger(...)) or logger=True, or remove the LearningRateMonitor callback."
            )
        if self.log_momentum and not all(
            "momentum" in opt.defaults or "betas" in opt.defaults for opt, _, _ in self._named_optimizers(trainer)
        ):
            warnings.warn(
                "LearningRateMonitor(log_momentum=True): some optimizers have no momentum; 0 is logged for them.",
                RuntimeWarning,
                stacklevel=2,
            )
        names = [name for _, group_names, _ in self._named_optimizers(trainer) for name in group_names]
        self.lrs = {name: [] for name in names}
        self.last_momentum_values = {f"{name}-momentum": None for name in names}
        self.last_weight_decay_values = {f"{name}-weight_decay": None for name in names}

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        """Log step-interval rates on the steps the trainer logs."""
        if self.logging_interval == "epoch" or not self._is_log_step(trainer):
            return
        self._log(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        """Log epoch-interval rates at the start of each epoch."""
        if self.logging_interval == "step":
            return
        self._log(trainer, "epoch" if self.logging_interval is None else "any")

    # -- collecting

    @staticmethod
    def _is_log_step(trainer) -> bool:
        # Same cadence as the trainer's own metric logging; "+ 1" because the step has not run yet.
        every = getattr(trainer, "log_every_n_steps", 1)
        if every == 0:
            return False
        return (trainer.fit_loop_batches_that_stepped + 1) % every == 0 or trainer.should_stop

    def _log(self, trainer, interval: str) -> None:
        stats = self._extract_stats(trainer, interval)
        if stats:
            trainer.log_metrics(stats, step=trainer.fit_loop_batches_that_stepped)

    def _extract_stats(self, trainer, interval: str) -> dict[str, float]:
        stats: dict[str, float] = {}
        for optimizer, names, scheduler_interval in self._named_optimizers(trainer):
            if scheduler_interval is not None and interval not in (scheduler_interval, "any"):
                continue
            self._carry_history_over(names)
            stats.update(self._optimizer_stats(optimizer, names))
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in stats.items()})
        return stats

    def _optimizer_stats(self, optimizer: Optimizer, names: list[str]) -> dict[str, float]:
        stats: dict[str, float] = {}
        use_betas = "betas" in optimizer.defaults
        for group, name in zip(optimizer.param_groups, names):
            lr = float(group["lr"])
            self.lrs.setdefault(name, []).append(lr)
            stats[name] = lr
            if self.log_momentum:
                momentum = float(group["betas"][0] if use_betas else group.get("momentum", 0))
                self.last_momentum_values[f"{name}-momentum"] = momentum
                stats[f"{name}-momentum"] = momentum
            if self.log_weight_decay:
                weight_decay = float(group.get("weight_decay", 0))
                self.last_weight_decay_values[f"{name}-weight_decay"] = weight_decay
                stats[f"{name}-weight_decay"] = weight_decay
        return stats

    def _carry_history_over(self, names: list[str]) -> None:
        # An optimizer that gained a param group renames "lr-X" to "lr-X/pg1"; keep its history.
        for name in names:
            old = name.removesuffix("/pg1")
            if old != name and old in self.lrs:
                self.lrs[name] = self.lrs.pop(old)

    # -- naming

    def _named_optimizers(self, trainer) -> list[tuple[Optimizer, list[str], str | None]]:
        """Every optimizer once, with one name per param group and its scheduler's interval (None: no scheduler)."""
        entries: list[tuple[Optimizer, list[str], str | None]] = []
        seen: list[Optimizer] = []
        per_class: defaultdict[type, int] = defaultdict(int)

        def group_names(optimizer: Optimizer, base: str, counts: bool) -> list[str]:
            seen.append(optimizer)
            cls = type(optimizer)
            if counts:  # a scheduler name chosen by the user is not a class-derived name
                per_class[cls] += 1
            if per_class.get(cls, 0) > 1:
                base = f"{base}-{per_class[cls] - 1}"
            groups = optimizer.param_groups
            self._check_unique_group_names(base, groups)
            return [self._group_name(base, groups, i) for i in range(len(groups))]

        for config in trainer.lr_scheduler_configs:
            optimizer = config.scheduler.optimizer
            base = config.name if config.name is not None else f"lr-{type(optimizer).__name__}"
            entries.append((optimizer, group_names(optimizer, base, config.name is None), config.interval))
        for optimizer in trainer.optimizers:
            optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap optimizer wrappers
            if any(optimizer is other for other in seen):
                continue
            entries.append((optimizer, group_names(optimizer, f"lr-{type(optimizer).__name__}", True), None))
        return entries

    @staticmethod
    def _group_name(base: str, groups: list[dict], index: int) -> str:
        own_name = groups[index].get("name")
        if len(groups) > 1:
            return f"{base}/{own_name if own_name is not None else f'pg{index + 1}'}"
        return f"{base}/{own_name}" if own_name else base

    @staticmethod
    def _check_unique_group_names(base: str, groups: list[dict]) -> None:
        names = [group.get("name", f"pg{i}") for i, group in enumerate(groups, start=1)]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise MisconfigurationError(
                f"LearningRateMonitor: the optimizer logged as {base!r} has several param groups named "
                f"{duplicated}; give each param group a unique 'name'."
            )
