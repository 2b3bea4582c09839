"""Precision: autocast around the steps, the GradScaler, and dtype conversion.

``32-true`` does nothing. ``16-mixed`` and ``bf16-mixed`` run the step hooks
under ``torch.autocast`` (CPU or CUDA); ``16-mixed`` also scales the loss with
a GradScaler whose state goes into checkpoints. ``bf16-true`` and ``64-true``
convert the module and the floating-point inputs to that dtype.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true")
_TRUE_DTYPES = {"bf16-true": torch.bfloat16, "64-true": torch.float64}


def _convert_floats(data: Any, dtype: torch.dtype) -> Any:
    if isinstance(data, Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, dict):
        return {k: _convert_floats(v, dtype) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_convert_floats(v, dtype) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_convert_floats(v, dtype) for v in data)
    return data


class Precision:
    def __init__(self, precision: str, device: torch.device):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.device = device
        self.scaler: torch.amp.GradScaler | None = None
        if precision == "16-mixed":
            self.scaler = torch.amp.GradScaler(device.type)
        self._autocast_dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)

    def convert_module(self, module: nn.Module) -> nn.Module:
        dtype = _TRUE_DTYPES.get(self.precision)
        return module.to(dtype) if dtype is not None else module

    def convert_input(self, batch: Any) -> Any:
        dtype = _TRUE_DTYPES.get(self.precision)
        return _convert_floats(batch, dtype) if dtype is not None else batch

    def forward_context(self):
        """The context every step hook runs in."""
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def scale_loss(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def optimizer_step(self, optimizer: Optimizer, after_closure: Callable[[Optimizer], None], **kwargs: Any) -> None:
        """Step after the closure has run: unscale, call ``after_closure(optimizer)`` (hooks, clipping), step.

        With a GradScaler the step is skipped when gradients are not finite, and the scale is updated.
        """
        if self.scaler is None:
            after_closure(optimizer)
            optimizer.step(**kwargs)
            return
        self.scaler.unscale_(optimizer)
        after_closure(optimizer)
        self.scaler.step(optimizer, **kwargs)
        self.scaler.update()

    def closure_optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], after_closure: Callable[[Optimizer], None], **kwargs: Any
    ) -> Any:
        """Step an optimizer that evaluates the closure itself, maybe several times (LBFGS): the hooks and
        clipping follow every evaluation, before the optimizer reads the gradients."""

        def evaluate() -> Any:
            result = closure()
            after_closure(optimizer)
            return result

        return optimizer.step(closure=evaluate, **kwargs)

    def check_optimizer(self, optimizer: Optimizer) -> None:
        """Refuse an optimizer this precision cannot step."""
        if self.scaler is not None and requires_closure(optimizer):
            raise ValueError(
                f"precision='16-mixed' cannot step {type(optimizer).__name__}: its step() evaluates the closure "
                "itself, and a GradScaler must unscale the gradients between the closure and the step (as in "
                "Lightning, where AMP and LBFGS are not compatible). Use precision='bf16-mixed' or '32-true'"
            )

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def requires_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` must be given a closure to call (LBFGS), rather than stepping on gradients."""
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty
