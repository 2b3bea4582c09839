"""One training batch: automatic optimization (closure, accumulation, clipping) or manual.

Automatic optimization follows Lightning: the loss is divided by
``accumulate_grad_batches``; gradients are zeroed after ``training_step`` and
before ``backward`` on the first batch of each accumulation window; the
optimizer steps on the window's last batch or the epoch's last batch; the
precision plugin unscales before ``on_before_optimizer_step`` and clipping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from runtime.errors import DistributedSkipError, MisconfigurationError, NonFiniteLossError, StepOutputError

if TYPE_CHECKING:
    from runtime.engine import Engine


class OptimizerWrapper:
    """What ``self.optimizers()`` returns: ``step`` goes through precision, hooks and step counting."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine: "Engine"):
        self.optimizer = optimizer
        self._engine = engine

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return self._engine._optimizer_step(self.optimizer, closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        # Only names the wrapper lacks get here. While pickle or deepcopy rebuild a wrapper, `optimizer` is
        # not set yet, so reading `self.optimizer` would come back here forever.
        optimizer = self.__dict__.get("optimizer")
        if optimizer is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (no optimizer is wrapped yet)")
        return getattr(optimizer, name)

    def __repr__(self) -> str:
        return f"OptimizerWrapper({self.optimizer!r})"


def _rank_note(engine: "Engine", batch_idx: int) -> str:
    return f"rank {engine.global_rank}, epoch {engine.current_epoch}, batch {batch_idx}"


def parse_automatic_output(output: Any, engine: "Engine", batch_idx: int) -> tuple[Tensor | None, dict[str, Any]]:
    """(loss, extra outputs) from training_step's return value in automatic optimization."""
    if output is None:
        return None, {}
    if isinstance(output, Tensor):
        loss, extra = output, {}
    elif isinstance(output, Mapping):
        if "loss" not in output or output["loss"] is None:
            raise StepOutputError(
                f"training_step returned a dict without a 'loss' key ({_rank_note(engine, batch_idx)}; keys: "
                f"{sorted(output)}); put the loss tensor under 'loss'"
            )
        loss = output["loss"]
        extra = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in output.items() if k != "loss"}
    else:
        raise StepOutputError(
            f"training_step returned {type(output).__name__} ({output!r:.60}) at {_rank_note(engine, batch_idx)}; "
            "in automatic optimization it must return a loss tensor, a dict with a 'loss' tensor, or None to "
            "skip the batch"
        )
    if not isinstance(loss, Tensor):
        raise StepOutputError(
            f"training_step's loss is a {type(loss).__name__}, not a tensor ({_rank_note(engine, batch_idx)}); "
            "return the tensor itself (not loss.item()) so gradients can flow"
        )
    if loss.numel() != 1:
        raise StepOutputError(
            f"training_step returned a loss of shape {tuple(loss.shape)} at {_rank_note(engine, batch_idx)}; "
            "the loss must be a scalar: reduce it (e.g. loss.mean())"
        )
    return loss, extra


def refuse_distributed_skip(engine: "Engine", batch_idx: int) -> None:
    """training_step returned None on a step that all-reduces gradients in a distributed run: stop here.

    Lightning documents skipping a step by returning None as unsupported with several devices: this
    rank would run no backward, so it would never join DDP's gradient all-reduce and the other ranks
    would wait for it there. Raising on this rank costs nothing on the steps that do return a loss (no
    collective is needed to agree on anything), and its peers do not hang either: on Ray, Ray Train
    tears the worker group down when this rank fails; under a bare process group, gloo fails their
    all-reduce as soon as this process is gone (NCCL after ``collective_timeout_s``).
    """
    raise DistributedSkipError(
        f"training_step returned None on rank {engine.strategy.global_rank} at global_step {engine.global_step} "
        f"(epoch {engine.current_epoch}, batch_idx {batch_idx}). Skipping a step by returning None is not "
        "supported in a distributed run (as in Lightning): every rank must join the same gradient all-reduce, "
        "so the run stops here instead of hanging. Return a loss on every rank; to ignore a batch, return "
        "loss * 0"
    )


class AutomaticOptimization:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._distributed = engine.strategy.is_distributed

    def run(self, batch: Any, batch_idx: int, should_step: bool) -> dict[str, Any]:
        engine = self.engine
        # Only a step that all-reduces gradients can hang on a rank that skipped it; accumulation batches
        # run backward under no_sync, so a rank may skip one of those alone.
        closure = _Closure(engine, batch, batch_idx, check_skips=should_step and self._distributed)
        if should_step and not engine.hooks.custom_optimizer_step:
            # What the default LightningModule.optimizer_step does (optimizer.step(closure=closure) on the
            # wrapper), without its two calls.
            engine._optimizer_step(engine.optimizers[0], closure)
        elif should_step:
            steps_before = engine.global_step
            engine.lightning_module.optimizer_step(
                engine.current_epoch, batch_idx, engine._optimizer_wrappers[0], closure
            )
            # One step per optimizer_step call, as Lightning counts: an override that only runs the closure on
            # some batches (stepping every other batch) still advances global_step, max_steps and the schedules.
            engine.global_step = steps_before + 1
            if not closure.ran:
                raise MisconfigurationError(
                    "optimizer_step() was overridden but did not call `optimizer.step(closure=optimizer_closure)`; "
                    "the closure runs training_step and backward, so it must be passed to step()"
                )
        else:
            with engine.strategy.no_backward_sync(True):
                closure()
        return closure.outputs


class _Closure:
    """training_step -> (zero_grad on a window's first batch) -> backward, run once by the optimizer step."""

    __slots__ = ("engine", "batch", "batch_idx", "check_skips", "ran", "outputs")

    def __init__(self, engine: "Engine", batch: Any, batch_idx: int, check_skips: bool = False):
        self.engine = engine
        self.batch = batch
        self.batch_idx = batch_idx
        self.check_skips = check_skips
        self.ran = False
        self.outputs: dict[str, Any] = {}

    def __call__(self) -> Tensor | None:
        self.ran = True
        engine = self.engine
        batch_idx = self.batch_idx
        accumulate = engine.config.accumulate_grad_batches
        output = engine._training_step(self.batch, batch_idx)
        loss, extra = parse_automatic_output(output, engine, batch_idx)
        if self.check_skips and loss is None:
            refuse_distributed_skip(engine, batch_idx)
        if loss is not None:
            engine._check_finite_loss(loss, batch_idx)
            if accumulate > 1:
                loss = loss / accumulate
            self.outputs = {"loss": loss.detach(), **extra} if extra else {"loss": loss.detach()}
        else:
            self.outputs = {}
        # Zeroing happens even when the batch is skipped (training_step returned None), so the
        # optimizer step that follows sees no stale gradients, as in Lightning.
        if batch_idx % accumulate == 0:
            engine._zero_grad(engine.optimizers[0], batch_idx)
        if loss is not None:
            engine._backward(loss, engine.optimizers[0])
        return loss


class ManualOptimization:
    def __init__(self, engine: "Engine"):
        self.engine = engine

    def run(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        engine = self.engine
        output = engine._training_step(batch, batch_idx)
        if output is None:
            return {}
        if isinstance(output, Tensor):
            return {"loss": output.detach()}
        if isinstance(output, Mapping):
            return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in output.items()}
        raise StepOutputError(
            f"training_step returned {type(output).__name__} at {_rank_note(engine, batch_idx)}; in manual "
            "optimization it must return a tensor, a dict, or nothing"
        )
