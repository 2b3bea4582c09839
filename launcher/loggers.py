"""Driver-side experiment loggers: :class:`TensorBoardLogger` and :class:`CSVLogger`.

Both are :class:`runtime.sinks.MetricsSink` implementations that live on the
driver: metric rows reach them already reduced across ranks, and they write
into the driver's run directory, so no shared filesystem is needed.

Where files go (``log_dir``):

- ``save_dir`` given: files go to ``<save_dir>/<name>/<version>`` as in
  Lightning (``name`` is ``"lightning_logs"`` unless given; ``None`` or ``""``
  leaves it out), where ``version=None`` picks the next free ``version_N``
  (once: the first time the logger is used or copied, then it keeps it) and
  an int ``N`` means ``version_N``.
- ``save_dir=None`` (the default): the Trainer calls :meth:`attach` with the
  run directory ``<default_root_dir>/<run_name>/``, which is already this
  run's own directory, so it takes the place of ``<save_dir>/<name>/<version>``
  and files go straight into it; a ``name`` other than ``"lightning_logs"``
  and a ``version``, when given, add ``<name>/<version>`` below it (to keep
  two loggers of one kind apart).

A TensorBoardLogger's ``sub_dir`` is one more directory at the end of either.

A logger opens no file until it first writes, so it can be pickled (and
shipped with the job) before :meth:`attach`; pickling drops open writers,
which reopen on the next write.
"""

from __future__ import annotations

import csv
import json
import os
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.sinks import Progress

__all__ = ["CSVLogger", "TensorBoardLogger"]

_PREFIX_JOIN = "-"  # Lightning joins a logger prefix and a metric name with "-"
DEFAULT_NAME = "lightning_logs"  # Lightning's loggers' default ``name``


def _version_dirname(version: int | str) -> str:
    return f"version_{version}" if isinstance(version, int) else version


def _next_version(root: str) -> int:
    """One past the highest ``version_N`` directory under ``root`` (0 if none)."""
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    found = [
        int(n[len("version_") :])
        for n in names
        if n.startswith("version_") and n[len("version_") :].isdigit() and os.path.isdir(os.path.join(root, n))
    ]
    return max(found) + 1 if found else 0


def _as_dict(params: Mapping[str, Any] | Namespace) -> dict[str, Any]:
    return dict(vars(params)) if isinstance(params, Namespace) else dict(params)


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a hyperparameter value; anything unknown becomes ``str(value)``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor / numpy scalar
        return value.item()
    return str(value)


def _flatten(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 1}}`` -> ``{"opt/lr": 1}``: TensorBoard's hparams table is flat."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


class _DirectoryLogger:
    """Where a driver-side logger writes: the ``save_dir``/``name``/``version`` rules above."""

    wants_progress = False  # progress() is a no-op for file loggers

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None,
        name: str | None,
        version: int | str | None,
        prefix: str,
        sub_dir: str | os.PathLike[str] | None = None,
    ):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}(name={name!r}): expected a str (a sub-directory name) or ''")
        if version is not None and not (
            (isinstance(version, int) and not isinstance(version, bool) and version >= 0)
            or (isinstance(version, str) and version)
        ):
            raise ValueError(
                f"{type(self).__name__}(version={version!r}): expected None (next free version_N),"
                " an int >= 0 (version_N) or a non-empty directory name"
            )
        self._save_dir = os.fspath(save_dir) if save_dir is not None else None
        self._name = name or ""
        self._version = version
        self._prefix = prefix
        self._sub_dir = os.fspath(sub_dir) if sub_dir is not None else None
        self._run_dir: str | None = None
        self._resume_step: int | None = None
        self._log_dir: str | None = None  # resolved on first use, then fixed

    # -- where
    @property
    def save_dir(self) -> str | None:
        """The ``save_dir`` given, or None when files go into the run directory."""
        return self._save_dir

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str | None:
        """The version; with a ``save_dir`` and no version given, the next free ``version_N`` number."""
        if self._version is None and self._save_dir is not None:
            self._version = _next_version(self.root_dir)
        return self._version

    @property
    def root_dir(self) -> str:
        """The directory that holds the versions: ``<save_dir>/<name>``, or its place in the run directory."""
        if self._save_dir is not None:
            return os.path.normpath(os.path.join(self._save_dir, self._name))
        if self._run_dir is None:
            raise RuntimeError(
                f"{type(self).__name__} has no directory yet: it was built with save_dir=None, so it writes"
                " into the run directory, which the Trainer passes with attach(run_dir). Call attach()"
                " first, or pass save_dir=..."
            )
        # The run directory is already this run's own: the default name adds nothing below it.
        name = "" if self._name == DEFAULT_NAME else self._name
        return os.path.normpath(os.path.join(self._run_dir, name))

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def log_dir(self) -> str:
        """The directory this logger writes into (see the module docstring)."""
        if self._log_dir is None:
            path = self.root_dir
            version = self.version
            if version is not None:
                path = os.path.join(path, _version_dirname(version))
            if self._sub_dir:
                path = os.path.join(path, self._sub_dir)
            self._log_dir = os.path.normpath(path)
        return self._log_dir

    def attach(self, run_dir: str | os.PathLike[str], *, resume_step: int | None = None) -> None:
        """Bind to the run directory before the run starts; called by the Trainer.

        ``resume_step``: the global step a resumed run restarts from. Rows
        logged at this step or later by the interrupted run are dropped (they
        will be logged again), so a resumed run's logs have no duplicates.
        Attaching again to the same directory without ``resume_step`` changes
        nothing, so ``test()`` after ``fit()`` appends to the same files.
        """
        run_dir = os.fspath(run_dir)
        if run_dir == self._run_dir and resume_step is None:
            return  # e.g. trainer.test() after fit(): keep writing where fit wrote
        self._close()
        self._run_dir = run_dir
        self._resume_step = resume_step
        self._log_dir = None
        self._on_attach()

    def _key(self, name: str) -> str:
        return f"{self._prefix}{_PREFIX_JOIN}{name}" if self._prefix else name

    # -- hooks for subclasses
    def _on_attach(self) -> None:
        pass

    def _close(self) -> None:
        pass

    # -- MetricsSink
    def progress(self, update: Progress) -> None:
        """Progress updates are for the progress bar; loggers ignore them."""

    def __repr__(self) -> str:
        where = self._log_dir or self._save_dir or "<run dir>"
        return f"{type(self).__name__}({where!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Copies write for this logger (the Ray sink actor's, one per fit/validate/test/predict; the job file's):
        # the next free version is picked once, here, so that they all write into this logger's log_dir instead
        # of each picking its own. As in Lightning, one logger object keeps one version for its whole life.
        _ = self.version
        return self.__dict__.copy()


class _EventFile:
    """Scalars, text and hparams written with TensorBoard's own event-file writer.

    TensorBoard's writer and protos need neither torch nor TensorFlow, so the
    process that writes the driver's logs (on Ray, the sink actor) starts in a
    fraction of the time ``torch.utils.tensorboard`` would take.
    """

    def __init__(self, log_dir: str, purge_step: int | None, max_queue: int = 10, flush_secs: int = 120,
                 filename_suffix: str = ""):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event = Event
        self._writer = EventFileWriter(log_dir, max_queue, flush_secs, filename_suffix)
        if purge_step is not None:
            # A START session log at step N tells TensorBoard to hide events of earlier files from step N on.
            self._writer.add_event(Event(step=purge_step, wall_time=time.time(),
                                         session_log=SessionLog(status=SessionLog.START)))

    def add_summary(self, values: list[Any], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._writer.add_event(self._Event(step=step, wall_time=time.time(), summary=Summary(value=values)))

    def scalar(self, tag: str, value: float) -> Any:
        from tensorboard.compat.proto.summary_pb2 import Summary

        return Summary.Value(tag=tag, simple_value=value)

    def text(self, tag: str, text: str) -> Any:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        return Summary.Value(tag=f"{tag}/text_summary", metadata=metadata, tensor=tensor)

    def hparams(self, flat: Mapping[str, bool | int | float | str], metric_tags: list[str]) -> list[Any]:
        """The three summaries TensorBoard's HPARAMS tab reads: experiment, session start and end.

        ``metric_tags``: the scalars the tab shows beside the hyperparameters.
        """
        from google.protobuf.struct_pb2 import Value
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        def summary(tag: str, **content: Any) -> Any:
            data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
            plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
            return Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))

        values, infos = {}, []
        for name, value in flat.items():
            if isinstance(value, bool):
                values[name], kind = Value(bool_value=value), api_pb2.DATA_TYPE_BOOL
            elif isinstance(value, (int, float)):
                values[name], kind = Value(number_value=value), api_pb2.DATA_TYPE_FLOAT64
            else:
                values[name], kind = Value(string_value=str(value)), api_pb2.DATA_TYPE_STRING
            infos.append(api_pb2.HParamInfo(name=name, type=kind))
        return [
            summary(metadata.EXPERIMENT_TAG, experiment=api_pb2.Experiment(
                hparam_infos=infos,
                metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags],
            )),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=plugin_data_pb2.SessionStartInfo(hparams=values)),
            summary(metadata.SESSION_END_INFO_TAG,
                    session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)),
        ]

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TensorBoardLogger(_DirectoryLogger):
    """Writes metrics and hyperparameters as TensorBoard event files on the driver.

    Readable with ``tensorboard --logdir <log_dir>`` and with TensorBoard's
    ``EventAccumulator``. Scalars are tagged with the metric name (prefixed
    with ``prefix-`` when a prefix is given) at the logger step.
    Hyperparameters appear as a text entry ``hparams`` and, with metrics
    (``default_hp_metric=True`` logs ``hp_metric = -1`` at step 0, as
    Lightning does, for ``self.log("hp_metric", ...)`` to fill in), in
    TensorBoard's HPARAMS tab. ``log_graph=True`` adds the module's graph as
    each fit/validate/test/predict starts, traced on the driver with the
    module's ``example_input_array``. ``sub_dir`` is a directory below
    ``<name>/<version>``. ``writer_kwargs`` (``max_queue``, ``flush_secs``,
    ``filename_suffix``) go to the event-file writer.

    ``experiment`` is a ``torch.utils.tensorboard.SummaryWriter`` on the same
    ``log_dir`` (opened on first use, as its own event file) for images,
    histograms and anything else not covered here.
    """

    _WRITER_KWARGS = ("max_queue", "flush_secs", "filename_suffix")

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        name: str | None = DEFAULT_NAME,
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | os.PathLike[str] | None = None,
        **writer_kwargs: Any,
    ):
        super().__init__(save_dir, name, version, prefix, sub_dir)
        unknown = sorted(set(writer_kwargs) - set(self._WRITER_KWARGS))
        if unknown:
            raise TypeError(
                f"TensorBoardLogger got unknown writer arguments {unknown}; it accepts {list(self._WRITER_KWARGS)}"
            )
        self._log_graph = bool(log_graph)
        self._default_hp_metric = bool(default_hp_metric)
        self._writer_kwargs = writer_kwargs
        self._events: _EventFile | None = None
        self._writer: Any = None

    def _event_file(self) -> _EventFile:
        if self._events is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._events = _EventFile(self.log_dir, self._resume_step, **self._writer_kwargs)
            # Purge once: a file reopened later (after finalize or unpickling)
            # must not hide what this run has logged since.
            self._resume_step = None
        return self._events

    @property
    def experiment(self) -> Any:
        """A ``SummaryWriter`` on ``log_dir`` (opened on first use) for anything not covered here."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            events = self._event_file()  # purges first, if this is a resumed run
            events.flush()
            self._writer = SummaryWriter(log_dir=self.log_dir, **self._writer_kwargs)
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """One scalar per metric at ``step``, flushed so ``tensorboard`` sees it promptly."""
        events = self._event_file()
        events.add_summary([events.scalar(self._key(name), float(value)) for name, value in metrics.items()], step)
        # flush() writes buffered events to the OS; it does not fsync, so this is cheap.
        events.flush()

    def log_hyperparams(
        self, params: Mapping[str, Any] | Namespace, metrics: Mapping[str, float] | float | None = None,
        step: int | None = None,
    ) -> None:
        """Hyperparameters as a readable text table and, with ``metrics``, for the HPARAMS tab (nested keys joined
        with "/"); the metrics are logged as scalars at ``step`` (0 when None).

        Without ``metrics``, ``default_hp_metric=True`` logs ``{"hp_metric": -1}``; a number is ``hp_metric``.
        """
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else {}
        elif not isinstance(metrics, Mapping):
            metrics = {"hp_metric": metrics}
        step = 0 if step is None else step
        plain = _plain(_as_dict(params))
        flat = {
            k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
            for k, v in _flatten(plain).items()
        }
        events = self._event_file()
        rows = "\n".join(f"|{k}|{v}|" for k, v in flat.items())
        events.add_summary([events.text("hparams", f"|name|value|\n|-|-|\n{rows}")], step=step)
        if metrics:
            # As in Lightning, the HPARAMS tab is written only with metrics: hyperparameters logged without
            # them would hide those a later log_hyperparams(params, metrics) call writes.
            self.log_metrics(metrics, step)
            events.add_summary(events.hparams(flat, [self._key(name) for name in metrics]), step=step)
        events.flush()

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """With ``log_graph=True``, the module's graph, traced with ``input_array`` or its ``example_input_array``.

        The Trainer calls it as each fit/validate/test/predict starts. Without an input it warns and logs nothing.
        """
        if not self._log_graph:
            return
        import torch

        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
        if not isinstance(input_array, (torch.Tensor, tuple)):
            got = "it is not set" if input_array is None else f"it is a {type(input_array).__name__}"
            warnings.warn(
                f"TensorBoardLogger(log_graph=True) logged no graph of {type(model).__name__}: tracing it needs an "
                f"example input and {got}. Set self.example_input_array in the module's __init__ to a tensor, or "
                "to a tuple of the forward() arguments",
                stacklevel=2,
            )
            return
        device = next((p.device for p in model.parameters()), None)
        if device is not None:  # a module left on an accelerator by an earlier in-process run
            if isinstance(input_array, torch.Tensor):
                input_array = input_array.to(device)
            else:
                input_array = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in input_array)
        # The trace runs forward() here: it must not draw from the generators training goes on with.
        with torch.random.fork_rng(devices=[]):
            try:
                self.experiment.add_graph(model, input_array)
            except Exception as err:  # noqa: BLE001 - a graph that cannot be traced must not stop the run
                warnings.warn(
                    f"TensorBoardLogger(log_graph=True) could not trace {type(model).__name__} with its example "
                    f"input ({type(err).__name__}: {err}); the run goes on without the graph. Check that "
                    "forward(example_input_array) runs, or pass log_graph=False",
                    stacklevel=2,
                )
                return
        self.experiment.flush()

    def flush(self) -> None:
        """Write buffered events to disk."""
        for writer in (self._events, self._writer):
            if writer is not None:
                writer.flush()

    def finalize(self, status: str) -> None:
        """Flush and close the event file; a later write opens a new one."""
        self._close()

    def _close(self) -> None:
        for writer in (self._events, self._writer):
            if writer is not None:
                writer.close()
        self._events = self._writer = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_events"] = state["_writer"] = None  # open files cannot travel; they reopen on the next write
        return state


class CSVLogger(_DirectoryLogger):
    """Writes metric rows to ``<log_dir>/metrics.csv`` and hyperparameters to ``<log_dir>/hparams.json``.

    Like Lightning's CSV logger, each logged row is one CSV row with a
    ``step`` column; the header is the sorted union of every key seen, and
    when a new key appears the file is rewritten with the wider header.
    Rows are buffered and written every ``flush_logs_every_n_steps`` rows and
    at :meth:`finalize`. Hyperparameters go to JSON rather than Lightning's
    ``hparams.yaml`` so raylight needs no YAML dependency.

    An existing ``metrics.csv`` in ``log_dir`` is never deleted: new rows
    are appended under its header (widened if needed). After
    ``attach(run_dir, resume_step=N)`` its rows from step N on are dropped
    first, since the resumed run logs them again. (Lightning replaces the
    file instead; here the run directory is the record a resumed run
    continues, so losing rows would be worse than keeping them.)
    """

    METRICS_FILE = "metrics.csv"
    HPARAMS_FILE = "hparams.json"

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        name: str | None = DEFAULT_NAME,
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ):
        super().__init__(save_dir, name, version, prefix)
        every = flush_logs_every_n_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"CSVLogger(flush_logs_every_n_steps={flush_logs_every_n_steps!r}): expected an int >= 1"
                " (rows buffered before they are written)"
            )
        self._flush_every = flush_logs_every_n_steps
        self._rows: list[dict[str, float]] = []
        self._keys: list[str] = []  # header of the file on disk
        self._prepared = False  # whether the existing file was dealt with

    @property
    def metrics_file_path(self) -> str:
        return os.path.join(self.log_dir, self.METRICS_FILE)

    def _on_attach(self) -> None:
        self._keys = []
        self._prepared = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one row (metrics plus ``step``); written every ``flush_logs_every_n_steps`` rows."""
        _ = self.log_dir  # fail now, not at the first flush, when there is nowhere to write
        row: dict[str, float | int] = {self._key(k): float(v) for k, v in metrics.items()}
        epoch = metrics.get("epoch")
        if epoch is not None and float(epoch).is_integer():
            # The loop's epoch counter arrives as a float like every metric; Lightning's file has 0, 1, 2.
            row[self._key("epoch")] = int(epoch)
        row["step"] = step
        self._rows.append(row)
        if len(self._rows) >= self._flush_every:
            self.flush()

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace) -> None:
        """Write ``hparams.json`` (replacing it atomically); values JSON cannot hold are stored as ``str``."""
        os.makedirs(self.log_dir, exist_ok=True)
        text = json.dumps(_plain(_as_dict(params)), indent=2)
        _atomic_write(os.path.join(self.log_dir, self.HPARAMS_FILE), lambda f: f.write(text + "\n"))

    def flush(self) -> None:
        """Write buffered rows, widening the file's header first if new keys appeared."""
        self._prepare_file()
        if not self._rows:
            return
        new_keys = {k for row in self._rows for k in row} - set(self._keys)
        path = self.metrics_file_path
        if new_keys:
            old_rows = _read_rows(path) if self._keys else []
            self._keys = sorted(set(self._keys) | new_keys)
            rows = old_rows + self._rows
            _atomic_write(path, lambda f: _write_rows(f, self._keys, rows))
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._keys).writerows(self._rows)
        self._rows = []

    def finalize(self, status: str) -> None:
        """Write any buffered rows."""
        self.flush()

    def _close(self) -> None:
        if self._rows:
            self.flush()  # rows logged before a re-attach belong to the old directory

    def _prepare_file(self) -> None:
        """On the first write after attach: adopt an existing file's header, dropping rows a resumed run redoes."""
        if self._prepared:
            return
        path = self.metrics_file_path
        os.makedirs(self.log_dir, exist_ok=True)
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                kept = [r for r in reader if self._resume_step is None or _row_step(r) < self._resume_step]
            if self._resume_step is not None:
                _atomic_write(path, lambda f: _write_rows(f, keys, kept))
            self._keys = keys
        self._prepared = True


def _row_step(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


def _read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(f, keys: list[str], rows: list[Mapping[str, Any]]) -> None:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)


def _atomic_write(path: str, write) -> None:
    """Write via a temporary file and rename, so a reader never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)
