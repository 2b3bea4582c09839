"""Turn whatever ``configure_optimizers`` returned into optimizers and scheduler configs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau

from runtime.errors import MisconfigurationError

_FORMATS = (
    "configure_optimizers() must return one of: an optimizer; a list of optimizers; "
    "([optimizers], [schedulers]); {'optimizer': opt, 'lr_scheduler': sched_or_dict, 'monitor': ...}; "
    "or a list of such dicts"
)


@dataclass
class LRSchedulerConfig:
    """One scheduler and when to step it (Lightning's scheduler dict keys)."""

    scheduler: Any
    name: str | None = None
    interval: str = "epoch"  # "epoch" or "step"
    frequency: int = 1
    reduce_on_plateau: bool = False
    monitor: str | None = None
    strict: bool = True
    opt_idx: int | None = None


class NoOptimizer(Optimizer):
    """Stands in when ``configure_optimizers`` returns None: each step runs the closure (training_step and
    backward) and changes nothing, so the loops, the step counter and checkpoints work as with a real one.
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {})

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, Optimizer) or (hasattr(obj, "step") and hasattr(obj, "param_groups"))


_SCHEDULER_FIELDS = frozenset(f.name for f in fields(LRSchedulerConfig))  # the keys of a scheduler dict


def _check_dict(conf: dict) -> None:
    allowed = {"optimizer", "lr_scheduler", "monitor"}
    extra = set(conf) - allowed
    if extra:
        # Lightning warns and goes on; a scheduler key here is usually meant for the 'lr_scheduler' dict.
        misplaced = sorted(extra & (_SCHEDULER_FIELDS - {"reduce_on_plateau", "opt_idx"}))
        hint = f"; {misplaced} belong inside the 'lr_scheduler' dict" if misplaced else ""
        warnings.warn(
            f"configure_optimizers() returned a dict with keys {sorted(extra)} that are ignored (allowed: "
            f"{sorted(allowed)}){hint}",
            RuntimeWarning,
            stacklevel=4,
        )
    if "optimizer" not in conf:
        raise MisconfigurationError("configure_optimizers() returned a dict without an 'optimizer' key; " + _FORMATS)


def parse_optimizers(conf: Any) -> tuple[list[Optimizer], list[Any], str | None]:
    """(optimizers, raw schedulers, monitor) from any supported return format."""
    if conf is None:
        return [NoOptimizer()], [], None
    if _is_optimizer(conf):
        return [conf], [], None
    if isinstance(conf, dict):
        _check_dict(conf)
        schedulers = [conf["lr_scheduler"]] if "lr_scheduler" in conf else []
        return [conf["optimizer"]], schedulers, conf.get("monitor")
    if isinstance(conf, (list, tuple)):
        if not conf:
            raise MisconfigurationError(f"{_FORMATS}; got an empty {type(conf).__name__}")
        if len(conf) == 2 and isinstance(conf[0], list) and all(_is_optimizer(o) for o in conf[0]):
            schedulers = conf[1] if isinstance(conf[1], list) else [conf[1]]
            return list(conf[0]), list(schedulers), None
        if conf and all(isinstance(d, dict) for d in conf):
            for d in conf:
                _check_dict(d)
            schedulers = [
                dict(d["lr_scheduler"]) if isinstance(d["lr_scheduler"], dict) else {"scheduler": d["lr_scheduler"]}
                for d in conf
                if "lr_scheduler" in d
            ]
            monitors = [d.get("monitor") for d in conf]
            for sched, monitor in zip([s for s in schedulers], monitors):
                if monitor is not None:
                    sched.setdefault("monitor", monitor)
            return [d["optimizer"] for d in conf], schedulers, None
        if all(_is_optimizer(o) for o in conf):
            return list(conf), [], None
    raise MisconfigurationError(f"{_FORMATS}; got {type(conf).__name__}: {conf!r:.120}")


def scheduler_configs(
    schedulers: list[Any], monitor: str | None, optimizers: list[Optimizer], automatic: bool
) -> list[LRSchedulerConfig]:
    """Validate each scheduler (dict or object) into an :class:`LRSchedulerConfig`."""
    allowed = _SCHEDULER_FIELDS
    configs: list[LRSchedulerConfig] = []
    for raw in schedulers:
        if isinstance(raw, dict):
            unknown = set(raw) - allowed
            if unknown:
                warnings.warn(
                    f"lr scheduler dict has unsupported keys {sorted(unknown)}; they are ignored "
                    f"(supported: {sorted(allowed - {'opt_idx'})})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            values = {k: v for k, v in raw.items() if k in allowed}
            if "scheduler" not in values:
                raise MisconfigurationError(
                    "the lr scheduler dict must have a 'scheduler' key holding the scheduler object"
                )
            if values.get("interval", "epoch") not in ("step", "epoch"):
                raise MisconfigurationError(
                    f"lr scheduler 'interval' must be 'step' or 'epoch', got {values['interval']!r}"
                )
            if int(values.get("frequency", 1)) < 1:
                raise MisconfigurationError(
                    f"lr scheduler 'frequency' must be a positive integer, got {values['frequency']!r}"
                )
            values.setdefault("reduce_on_plateau", isinstance(values["scheduler"], ReduceLROnPlateau))
            if values["reduce_on_plateau"] and values.get("monitor") is None and monitor is not None:
                values["monitor"] = monitor
            config = LRSchedulerConfig(**values)
        else:
            config = LRSchedulerConfig(
                raw, reduce_on_plateau=isinstance(raw, ReduceLROnPlateau), monitor=monitor
            )
        if not (callable(getattr(config.scheduler, "state_dict", None)) and callable(getattr(config.scheduler, "load_state_dict", None))):
            # Checked here, as in Lightning: otherwise the first checkpoint fails, an epoch or more into the run.
            raise MisconfigurationError(
                f"the lr scheduler {type(config.scheduler).__name__} has no state_dict()/load_state_dict(), so "
                "checkpoints could not save or resume it; give it both (torch's LRScheduler classes have them)"
            )
        if automatic and config.reduce_on_plateau and config.monitor is None:
            raise MisconfigurationError(
                "a ReduceLROnPlateau scheduler needs the metric to watch: return "
                "{'optimizer': opt, 'lr_scheduler': {'scheduler': sched, 'monitor': 'val_loss'}} "
                "(or 'monitor' next to 'lr_scheduler') from configure_optimizers"
            )
        if isinstance(config.scheduler, OneCycleLR) and config.interval == "epoch":
            warnings.warn(
                "a OneCycleLR scheduler steps once per epoch here; you probably want 'interval': 'step'",
                RuntimeWarning,
                stacklevel=3,
            )
        sched_opt = getattr(config.scheduler, "optimizer", None)
        for idx, opt in enumerate(optimizers):
            if opt is sched_opt:
                config.opt_idx = idx
        if sched_opt is not None and config.opt_idx is None:
            raise MisconfigurationError(
                f"the scheduler {type(config.scheduler).__name__} wraps an optimizer that configure_optimizers "
                "did not return; return that optimizer too"
            )
        configs.append(config)
    return configs
