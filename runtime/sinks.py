"""The runtime's only doors to the outside world.

The loops never write files or talk to a driver directly. They hand metric
rows to a :class:`MetricsSink` and finished checkpoint dicts to a
:class:`CheckpointSink`. In one process the launcher passes sinks that write
to the local run directory; on Ray it passes sinks that stream to the driver.
Only rank 0 calls a sink: other ranks get ``None`` and skip side effects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable


@dataclass(frozen=True)
class Progress:
    """One progress-bar update: where the loop is and the ``prog_bar`` values."""

    stage: str  # "train", "validate", "test", "predict", "sanity_check"
    epoch: int
    batch_idx: int  # batches finished in this epoch/pass (1-based count)
    total: int | None  # batches in this epoch/pass, None when unknown
    global_step: int
    metrics: Mapping[str, Any] = field(default_factory=dict)  # floats, or 0-d tensors within one process


@runtime_checkable
class MetricsSink(Protocol):
    """Where metric rows, hyperparameters and progress go (rank 0 only).

    A sink may set ``wants_progress = False`` or ``wants_metrics = False`` (both True when absent): the
    loops then build no Progress updates, or no metric rows, for it.
    """

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """A row of scalar metrics at a logger step (already reduced across ranks)."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """The module's hyperparameters, once per run."""

    def progress(self, update: Progress) -> None:
        """A progress-bar update; called often, so keep it cheap."""

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("finished", "failed", "interrupted")."""


@runtime_checkable
class CheckpointSink(Protocol):
    """Where checkpoint dicts are committed (rank 0 only).

    Paths are paths on the machine that owns the run directory (the driver).
    ``save`` must be atomic: a reader sees the old file or the complete new one.
    """

    def save(self, checkpoint: dict[str, Any], path: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def listdir(self, directory: str) -> list[str]:
        """The names in ``directory`` (none if it does not exist)."""
        ...


class NullMetricsSink:
    """Drops everything: used on ranks other than 0 and when logging is off."""

    wants_progress = False  # the loops skip building Progress updates nobody reads
    wants_metrics = False  # and metric rows: turning a CUDA value into a float waits for the GPU

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        pass

    def progress(self, update: Progress) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


class FanOutMetricsSink:
    """Sends every call to several sinks (loggers plus a progress bar)."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = list(sinks)

    @property
    def wants_progress(self) -> bool:
        return any(getattr(sink, "wants_progress", True) for sink in self.sinks)

    @property
    def wants_metrics(self) -> bool:
        return any(getattr(sink, "wants_metrics", True) for sink in self.sinks)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_hyperparams(params)

    def progress(self, update: Progress) -> None:
        for sink in self.sinks:
            sink.progress(update)

    def finalize(self, status: str) -> None:
        for sink in self.sinks:
            sink.finalize(status)

    def flush(self) -> None:
        """Write buffered rows to disk (before a checkpoint is committed)."""
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()


class LocalCheckpointSink:
    """Writes checkpoints to this machine's disk, atomically."""

    def save(self, checkpoint: dict[str, Any], path: str) -> None:
        from runtime.checkpoint.io import atomic_save

        atomic_save(checkpoint, path)

    def remove(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def listdir(self, directory: str) -> list[str]:
        return list_directory(directory)


def list_directory(directory: str) -> list[str]:
    """``os.listdir``, with no names for a directory that does not exist (yet)."""
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
