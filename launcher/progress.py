"""The driver's progress bar: a :class:`runtime.sinks.MetricsSink` drawn with tqdm.

The loops send one :class:`runtime.sinks.Progress` update per batch. The bar
shows, as Lightning's does, ``Epoch N`` for training (one bar, reset each
epoch), and ``Sanity Checking``, ``Validation``, ``Testing`` or
``Predicting`` for the evaluation passes, with the ``prog_bar`` metrics as
the postfix (floats to 3 significant digits).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from tqdm import tqdm

from runtime.sinks import Progress

__all__ = ["ProgressBar"]

_DESCRIPTIONS = {
    "validate": "Validation",
    "sanity_check": "Sanity Checking",
    "test": "Testing",
    "predict": "Predicting",
}
_PAD = 5  # pad short numbers to a fixed width so the postfix does not jitter


def _format_value(value: Any) -> str:
    """3 significant digits for floats (``0.12345`` -> ``0.123``), padded to a steady width."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # 0-d tensors and numpy scalars
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, int):
        return str(value)
    text = tqdm.format_num(value)
    if "e" in text or "n" in text:  # exponent, nan, inf: leave as they are
        return text
    if "." not in text:
        text += "."
    return text.ljust(_PAD, "0")


class _Bar(tqdm):
    """A tqdm bar whose postfix is built from the latest metrics only when it is drawn.

    ``progress()`` runs once per batch but tqdm redraws at most every
    ``mininterval`` seconds, so formatting the metrics at draw time keeps the
    per-batch cost to an attribute store and a counter update.
    """

    metrics: Mapping[str, Any] = {}
    epoch: int = -1

    @property
    def format_dict(self) -> dict[str, Any]:
        info = super().format_dict
        if self.metrics:
            info["postfix"] = ", ".join(f"{k}={_format_value(v)}" for k, v in self.metrics.items())
        return info


class ProgressBar:
    """tqdm progress bars for training and evaluation, written to stderr.

    Args:
        enabled: False makes every call a no-op (``Trainer(enable_progress_bar=False)``).
        leave: keep each finished training epoch's bar on screen instead of
            reusing one bar for all epochs (Lightning's ``TQDMProgressBar(leave=...)``);
            the last epoch's bar stays either way.
        file: where to draw; None means ``sys.stderr`` at the time a bar opens.
        mininterval: the least seconds between redraws.

    ``log_metrics`` and ``log_hyperparams`` do nothing: metrics reach the bar
    through ``Progress.metrics``. ``finalize`` closes every open bar.
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        leave: bool = False,
        file: TextIO | None = None,
        mininterval: float = 0.1,
    ):
        self.enabled = enabled
        self.leave = leave
        self._file = file
        self._mininterval = mininterval
        self._train: _Bar | None = None
        self._eval: _Bar | None = None  # validation, sanity check, test or predict pass
        self._eval_stage: str | None = None

    wants_metrics = False  # the bar shows prog_bar values from Progress updates, not logged rows

    @property
    def wants_progress(self) -> bool:
        return self.enabled

    # -- MetricsSink
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        pass

    def progress(self, update: Progress) -> None:
        """Advance the bar for ``update.stage`` to ``update.batch_idx`` and show its metrics."""
        if not self.enabled:
            return
        if update.stage == "train":
            bar = self._train_bar(update)
        else:
            bar = self._eval_bar(update)
        bar.metrics = update.metrics
        if update.batch_idx != bar.n:
            bar.update(update.batch_idx - bar.n)
        if bar is self._eval and update.total is not None and update.batch_idx >= update.total:
            self._close_eval()  # the pass is over; the next one (or training) gets its own bar

    def finalize(self, status: str) -> None:
        """Close all bars; a later run through this object opens new ones."""
        self._close_eval()
        if self._train is not None:
            self._train.close()
            self._train = None

    # -- bars
    def _open(self, desc: str, total: int | None, position: int, leave: bool) -> _Bar:
        return _Bar(
            desc=desc,
            total=total,
            position=position,
            leave=leave,
            file=self._file if self._file is not None else sys.stderr,
            dynamic_ncols=True,
            mininterval=self._mininterval,
            smoothing=0,
        )

    def _train_bar(self, update: Progress) -> _Bar:
        self._close_eval()  # training resumed, so any validation pass has ended
        bar = self._train
        if bar is not None and bar.epoch == update.epoch and update.batch_idx >= bar.n:
            return bar
        if bar is not None and not self.leave:
            # Describe before reset(): reset() redraws, and must not show the old epoch.
            bar.metrics = {}
            bar.set_description(f"Epoch {update.epoch}", refresh=False)
            bar.reset(total=update.total)
        else:
            if bar is not None:
                bar.close()
            # leave=True: the last epoch's bar stays on screen after the run, as in Lightning.
            bar = self._train = self._open(f"Epoch {update.epoch}", update.total, 0, leave=True)
        bar.epoch = update.epoch
        return bar

    def _eval_bar(self, update: Progress) -> _Bar:
        bar = self._eval
        if bar is not None and self._eval_stage == update.stage and update.batch_idx >= bar.n:
            return bar
        self._close_eval()
        inside_fit = self._train is not None
        # Below the training bar and cleared when done during fit; kept on
        # screen for a standalone validate/test/predict. Sanity checks are never kept.
        leave = not inside_fit and update.stage != "sanity_check"
        desc = _DESCRIPTIONS.get(update.stage, update.stage.capitalize())
        self._eval = self._open(desc, update.total, 1 if inside_fit else 0, leave)
        self._eval_stage = update.stage
        return self._eval

    def _close_eval(self) -> None:
        if self._eval is not None:
            self._eval.close()
            self._eval = None
            self._eval_stage = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Open bars hold the terminal; a copy starts without any.
        state.update(_train=None, _eval=None, _eval_stage=None)
        if state["_file"] is not None and state["_file"] in (sys.stderr, sys.stdout):
            state["_file"] = None
        return state
