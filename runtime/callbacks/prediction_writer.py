"""BasePredictionWriter: write predictions as they are made, instead of keeping them all in memory."""

from __future__ import annotations

from typing import Any, Sequence

from runtime.callbacks.base import Callback
from runtime.errors import MisconfigurationError

_INTERVALS = ("batch", "epoch", "batch_and_epoch")


class BasePredictionWriter(Callback):
    """Subclass it and override ``write_on_batch_end`` and/or ``write_on_epoch_end`` (Lightning's API).

    ``write_interval="batch"`` calls ``write_on_batch_end`` after each ``predict_step`` with that batch's
    prediction and the dataset indices of its samples; ``"epoch"`` calls ``write_on_epoch_end`` once at the
    end with every prediction of this rank (kept for it even with ``return_predictions=False``, as in
    Lightning) and their indices per dataloader; ``"batch_and_epoch"`` does both. In a distributed run each
    rank writes its own share: the indices say which samples those were. Pair it with
    ``trainer.predict(..., return_predictions=False)`` so that predictions are neither kept nor sent back
    to the driver.
    """

    def __init__(self, write_interval: str = "batch") -> None:
        if write_interval not in _INTERVALS:
            raise MisconfigurationError(
                f"BasePredictionWriter(write_interval={write_interval!r}): use one of {', '.join(map(repr, _INTERVALS))}"
            )
        self.write_interval = write_interval

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write one batch's prediction (``write_interval`` "batch" or "batch_and_epoch")."""
        raise NotImplementedError(f"{type(self).__name__} must override write_on_batch_end")

    def write_on_epoch_end(
        self, trainer: Any, pl_module: Any, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        """Write all of this rank's predictions (``write_interval`` "epoch" or "batch_and_epoch")."""
        raise NotImplementedError(f"{type(self).__name__} must override write_on_epoch_end")

    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.write_interval != "epoch":
            loop = trainer.predict_loop
            self.write_on_batch_end(trainer, pl_module, outputs, loop.current_batch_indices, batch, batch_idx, dataloader_idx)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.write_interval != "batch":
            loop = trainer.predict_loop
            self.write_on_epoch_end(trainer, pl_module, loop.predictions, loop.epoch_batch_indices)
