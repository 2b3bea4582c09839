"""What ``self.log`` writes into: per-step values and per-epoch accumulators.

Reductions across ranks are batched: every ``sync_dist`` value pending at a
log boundary travels in one ``all_gather`` of a packed vector, whatever the
number of metrics (Lightning issues one collective per value).

A torchmetrics ``Metric`` may be logged too: its last ``forward`` value is the
step value and its ``compute()`` the epoch value, after which it is reset.
torchmetrics is never imported here: a Metric can only exist once the user's
code has imported it, so it is looked up in ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from runtime.errors import MisconfigurationError

_REDUCTIONS = ("mean", "sum", "max", "min")
# Step values of other dtypes (integers, bool, float16, bfloat16) are read as float32, as in Lightning.
_READ_DTYPES = (torch.float32, torch.float64)

# (allowed on_step, allowed on_epoch, default on_step, default on_epoch); None = may not log.
_STEP_HOOK = ((False, True), (False, True), True, False)
_EVAL_STEP_HOOK = ((False, True), (False, True), False, True)
_EPOCH_HOOK = ((False,), (True,), False, True)
_HOOK_LOG_OPTIONS: dict[str, tuple | None] = {
    "training_step": _STEP_HOOK,
    "validation_step": _EVAL_STEP_HOOK,
    "test_step": _EVAL_STEP_HOOK,
    "on_before_backward": _STEP_HOOK,
    "backward": _STEP_HOOK,
    "on_after_backward": _STEP_HOOK,
    "on_before_optimizer_step": _STEP_HOOK,
    "optimizer_step": _STEP_HOOK,
    "configure_gradient_clipping": _STEP_HOOK,
    "clip_gradients": _STEP_HOOK,
    "on_before_zero_grad": _STEP_HOOK,
    "optimizer_zero_grad": _STEP_HOOK,
    "on_train_batch_start": _STEP_HOOK,
    "on_train_batch_end": _STEP_HOOK,
    "on_validation_batch_start": _EVAL_STEP_HOOK,
    "on_validation_batch_end": _EVAL_STEP_HOOK,
    "on_test_batch_start": _EVAL_STEP_HOOK,
    "on_test_batch_end": _EVAL_STEP_HOOK,
    "on_train_start": _EPOCH_HOOK,
    "on_validation_start": _EPOCH_HOOK,
    "on_test_start": _EPOCH_HOOK,
    "on_train_epoch_start": _EPOCH_HOOK,
    "on_train_epoch_end": _EPOCH_HOOK,
    "on_validation_epoch_start": _EPOCH_HOOK,
    "on_validation_epoch_end": _EPOCH_HOOK,
    "on_test_epoch_start": _EPOCH_HOOK,
    "on_test_epoch_end": _EPOCH_HOOK,
}


@dataclass
class _Entry:
    name: str  # the key (with "/dataloader_idx_N" where it applies)
    base: str  # the name given to self.log
    suffix: str  # "" or "/dataloader_idx_N"
    dataloader_idx: int | None  # the eval dataloader it was logged from (None: epoch-level hooks)
    on_step: bool
    on_epoch: bool
    prog_bar: bool
    logger: bool
    reduce_fx: str
    sync: bool
    step_value: Tensor | None = None  # latest step value (synced once `step_synced`)
    step_synced: bool = True
    # sum(value * batch_size) for mean, running sum/max/min otherwise: a float, or a float64 tensor on the
    # GPU the values were logged from (see _update)
    total: float | Tensor = 0.0
    weight: float = 0.0  # sum(batch_size) for mean
    epoch_value: Tensor | None = None  # reduced epoch value, None until computed
    updates: int = 0
    is_metric: bool = False  # the values are a torchmetrics Metric's (no total: the Metric holds the state)
    metric: Any = None  # that Metric, until it is reset

    @property
    def forked(self) -> bool:
        return self.on_step and self.on_epoch

    def step_key(self) -> str:
        return f"{self.base}_step{self.suffix}" if self.forked else self.name

    def epoch_key(self) -> str:
        return f"{self.base}_epoch{self.suffix}" if self.forked else self.name


def _initial_total(reduce_fx: str) -> float:
    return {"max": -math.inf, "min": math.inf}.get(reduce_fx, 0.0)


def _running_extreme(total: float | Tensor, value: float | Tensor, reduce_fx: str) -> float | Tensor:
    """The running max or min of ``total`` and ``value``; it stays a tensor (no GPU wait) once either is one."""
    if not isinstance(total, Tensor) and not isinstance(value, Tensor):
        return max(total, value) if reduce_fx == "max" else min(total, value)
    if not isinstance(total, Tensor):
        total, value = value, total
    if not isinstance(value, Tensor):
        return total.clamp(min=value) if reduce_fx == "max" else total.clamp(max=value)
    return torch.maximum(total, value) if reduce_fx == "max" else torch.minimum(total, value)


def _batch_sizes(batch: Any) -> Iterator[int | None]:
    """The first-dimension size of every tensor in ``batch``, in order; None for each leaf that is not one.

    Lightning's traversal: a string is a leaf (its characters are not samples), a mapping contributes its
    values, any other iterable its items, a dataclass its fields. Bytes and numeric numpy arrays hold no
    tensor whatever their length, so they are leaves here without being walked element by element.
    """
    if isinstance(batch, Tensor):
        yield 1 if batch.ndim == 0 else int(batch.size(0))
    elif isinstance(batch, (str, bytes, bytearray)) or _is_numeric_array(batch):
        yield None
    elif isinstance(batch, (Iterable, Mapping)):
        for item in batch.values() if isinstance(batch, Mapping) else batch:
            yield from _batch_sizes(item)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            yield from _batch_sizes(getattr(batch, field.name))
    else:
        yield None


def _is_numeric_array(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)  # numpy is not imported: an array is recognised by its dtype's kind
    return type(value).__module__ == "numpy" and getattr(dtype, "kind", "O") != "O"


def extract_batch_size(batch: Any) -> int:
    """The size of the first dimension of the first tensor found in the batch (Lightning's rule).

    Raises MisconfigurationError when the batch holds no tensor; warns when its tensors disagree.
    """
    fix = "pass it as self.log(..., batch_size=N)"
    found: int | None = None
    try:
        for size in _batch_sizes(batch):
            if found is None:
                found = size
            elif size is not None and size != found:
                warnings.warn(
                    f"The batch size inferred for self.log is ambiguous: the batch's first tensor has {found} rows, "
                    f"a later one {size}; {found} is used. If that is not the batch size, {fix}",
                    UserWarning,
                    stacklevel=2,
                )
                break
    except RecursionError:
        raise MisconfigurationError(
            f"The batch size for self.log could not be inferred: the {type(batch).__name__} batch is nested too "
            f"deeply to search for a tensor; {fix}"
        ) from None
    if found is None:
        raise MisconfigurationError(
            f"The batch size for self.log could not be inferred: the batch ({type(batch).__name__}: {batch!r:.80}) "
            f"holds no tensor; {fix}"
        )
    return found


class MetricCollector:
    """Holds the values logged during one loop (training, or one evaluation pass).

    ``gather`` is the strategy's packed all_gather (``Tensor[k] -> Tensor[world, k]``),
    or None in a single process.
    """

    def __init__(self, gather: Callable[[Tensor], Tensor] | None, training: bool):
        self._gather = gather
        self.training = training
        self.entries: dict[tuple[str | None, str], _Entry] = {}  # by (hook, key)
        self.current_fx: str | None = None
        self.dataloader_idx: int | None = None
        self.num_dataloaders = 1
        self._batch: Any = None
        self._batch_size: int | None = None
        self._validated: dict[tuple, _Entry] = {}  # log() calls already checked, for the per-step fast path

    # ------------------------------------------------------------- hook scope
    def begin(self, fx: str | None, batch: Any = None, dataloader_idx: int | None = None) -> None:
        self.current_fx = fx
        if batch is not None:
            self._batch = batch
            self._batch_size = None
        self.dataloader_idx = dataloader_idx

    def new_batch(self, batch: Any) -> None:
        self._batch = batch
        self._batch_size = None

    # -------------------------------------------------------------------- log
    def log(
        self,
        name: str,
        value: Any,
        *,
        prog_bar: bool,
        logger: bool,
        on_step: bool | None,
        on_epoch: bool | None,
        reduce_fx: Any,
        enable_graph: bool,
        sync_dist: bool,
        add_dataloader_idx: bool,
        batch_size: int | None,
        rank_zero_only: bool,
    ) -> None:
        fx = self.current_fx
        cache_key = (fx, name, on_step, on_epoch, reduce_fx, prog_bar, logger, sync_dist, add_dataloader_idx,
                     rank_zero_only, self.dataloader_idx, enable_graph)
        entry = self._validated.get(cache_key)
        if entry is not None and type(value) is Tensor and value.ndim == 0 and not enable_graph:
            # Same call as before from the same hook: the options are known to be valid.
            self._update(entry, value.detach(), batch_size)
            return
        options = _HOOK_LOG_OPTIONS.get(fx or "", None)
        if options is None:
            raise MisconfigurationError(
                f"self.log({name!r}, ...) is not allowed in `{fx}`; log from the step hooks, the batch/epoch "
                "start and end hooks, or the backward/optimizer hooks"
            )
        allowed_step, allowed_epoch, default_step, default_epoch = options
        on_step = default_step if on_step is None else bool(on_step)
        on_epoch = default_epoch if on_epoch is None else bool(on_epoch)
        if on_step not in allowed_step or on_epoch not in allowed_epoch:
            raise MisconfigurationError(
                f"self.log({name!r}, on_step={on_step}, on_epoch={on_epoch}) is not allowed in `{fx}`: "
                f"on_step may be {allowed_step}, on_epoch may be {allowed_epoch} there"
            )
        reduce_fx = _reduce_name(reduce_fx, name)
        metric = None if isinstance(value, (Tensor, float, int)) else _torchmetrics_metric(name, value)
        tensor = _to_scalar_tensor(name, value, enable_graph) if metric is None else None
        if not on_step and not on_epoch:
            raise MisconfigurationError(f"self.log({name!r}, on_step=False, on_epoch=False) records nothing; set one")

        suffix = ""
        if add_dataloader_idx and self.dataloader_idx is not None and self.num_dataloaders > 1:
            suffix = f"/dataloader_idx_{self.dataloader_idx}"
        key = name + suffix
        # One entry per hook and name, as in Lightning: a name logged from two hooks (per step in training_step,
        # once more in on_train_epoch_end) keeps two sets of values, and the hook that logged it last in the
        # loop gives the value that is read.
        entry = self.entries.get((fx, key))
        # A Metric syncs its own states across ranks in compute(); sync_dist and reduce_fx do not apply to it.
        sync = sync_dist and not rank_zero_only and self._gather is not None and metric is None
        if entry is None:
            entry = _Entry(
                key,
                name,
                suffix,
                self.dataloader_idx,
                on_step,
                on_epoch,
                prog_bar,
                logger,
                reduce_fx,
                sync,
                total=_initial_total(reduce_fx),
                is_metric=metric is not None,
            )
            self.entries[(fx, key)] = entry
        elif (entry.on_step, entry.on_epoch, entry.reduce_fx) != (on_step, on_epoch, reduce_fx):
            raise MisconfigurationError(
                f"self.log({name!r}) was called with different options in {fx} (on_step/on_epoch/"
                f"reduce_fx were {entry.on_step}/{entry.on_epoch}/{entry.reduce_fx!r}, now "
                f"{on_step}/{on_epoch}/{reduce_fx!r}); use one set of options per metric name"
            )
        elif entry.is_metric != (metric is not None):
            before, now = ("a torchmetrics Metric", "a number") if entry.is_metric else ("a number", "a Metric")
            raise MisconfigurationError(
                f"self.log({name!r}, value) was given {before} earlier in this loop and now {now} "
                f"({type(value).__name__}); log the two under different names"
            )
        entry.prog_bar, entry.logger, entry.sync = prog_bar, logger, sync
        if metric is not None:
            # Never in the fast-path cache: a tensor logged later with the same options must reach the check above.
            self._update_metric(entry, metric)
            return
        if isinstance(reduce_fx, str) or not callable(reduce_fx):
            self._validated[cache_key] = entry
        self._update(entry, tensor, batch_size)

    def _update(self, entry: _Entry, tensor: Tensor, batch_size: int | None) -> None:
        entry.updates += 1
        if entry.on_step:
            entry.step_value = tensor
            entry.step_synced = not entry.sync
        if entry.on_epoch:
            entry.epoch_value = None
            # On the CPU a Python float is the cheapest running value. On a GPU, float() would make the CPU
            # wait for the GPU at every step (the queue of work it had run ahead with drains), so there the
            # running value stays a tensor on the device until the epoch is reduced.
            value = float(tensor) if tensor.device.type == "cpu" else tensor.detach().double()
            reduce_fx = entry.reduce_fx
            if reduce_fx == "mean":
                weight = batch_size if batch_size is not None else self._current_batch_size()
                entry.total = entry.total + value * weight
                entry.weight += weight
            elif reduce_fx == "sum":
                entry.total = entry.total + value
            else:
                entry.total = _running_extreme(entry.total, value, reduce_fx)

    def _update_metric(self, entry: _Entry, metric: Any) -> None:
        entry.updates += 1
        entry.metric = metric
        if entry.on_step:
            # The value of the Metric's last forward(); None (no step value) if only update() has run.
            cache = metric._forward_cache
            entry.step_value = None if cache is None else _metric_value(entry.base, metric, cache, "forward()")
        if entry.on_epoch:
            entry.epoch_value = None

    def _current_batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = extract_batch_size(self._batch) if self._batch is not None else 1
        return self._batch_size

    # ---------------------------------------------------------- reductions
    def sync_step(self) -> None:
        """Reduce every step value logged with ``sync_dist`` since the last call: one collective.

        In one process nothing is ever pending (``sync_dist`` values need no reduction there).
        """
        if self._gather is None:
            return
        pending = [e for e in self.entries.values() if e.step_value is not None and not e.step_synced]
        if not pending:
            return
        # A constant number of tensor ops per step, whatever the number of metrics: every torch call
        # costs microseconds, so per-metric conversions and reductions would dominate a small step.
        values = [e.step_value for e in pending]
        dtypes = {v.dtype for v in values}
        with torch.no_grad():
            if len(dtypes) == 1:
                packed = torch.stack(values).to(torch.float64)
            else:  # converted one by one: stack's type promotion could round int64 through float32
                packed = torch.stack([v.to(torch.float64) for v in values])
            gathered = self._gather(packed)
            reduced = {fx: _reduce_rows(gathered, fx) for fx in {e.reduce_fx for e in pending}}
            # float32 and float64 values keep their dtype, others come back in the float dtype they are read in.
            default = _default_float_dtype()
            targets = [v.dtype if v.dtype in _READ_DTYPES else default for v in values]
            by_dtype = {dtype: {fx: r.to(dtype).unbind(0) for fx, r in reduced.items()} for dtype in set(targets)}
        for column, (entry, dtype) in enumerate(zip(pending, targets)):
            entry.step_value = by_dtype[dtype][entry.reduce_fx][column]
            entry.step_synced = True

    def compute_epoch(self) -> None:
        """Reduce every epoch accumulator not yet reduced: one collective for all synced ones."""
        pending = [e for e in self.entries.values() if e.on_epoch and e.epoch_value is None and e.updates]
        if not pending:
            return
        synced = [e for e in pending if e.sync]
        gathered_values: dict[str, tuple[float, float]] = {}
        if synced:
            flat: list[float] = []
            for entry in synced:
                flat.extend((float(entry.total), entry.weight))
            gathered = self._gather(torch.tensor(flat, dtype=torch.float64))
            for i, entry in enumerate(synced):
                totals, weights = gathered[:, 2 * i], gathered[:, 2 * i + 1]
                if entry.reduce_fx == "max":
                    gathered_values[entry.name] = (float(totals.max()), 1.0)
                elif entry.reduce_fx == "min":
                    gathered_values[entry.name] = (float(totals.min()), 1.0)
                else:
                    gathered_values[entry.name] = (float(totals.sum()), float(weights.sum()))
        for entry in pending:
            if entry.is_metric:
                # compute() syncs the Metric's states across ranks: a collective that every rank reaches here,
                # in the same order, as every rank logged the same names.
                entry.epoch_value = _metric_value(entry.base, entry.metric, entry.metric.compute(), "compute()")
                continue
            if entry.name in gathered_values:
                total, weight = gathered_values[entry.name]
            else:  # float() here, not as a default argument: a GPU total would be fetched twice
                total, weight = float(entry.total), entry.weight
            if entry.reduce_fx == "mean":  # no samples (empty batches only): NaN, as torch's 0 / 0 gives
                value = total / weight if weight else math.nan
            else:
                value = total
            entry.epoch_value = torch.tensor(value, dtype=torch.float32)

    def has_unsynced(self) -> bool:
        return any(
            (e.step_value is not None and not e.step_synced) or (e.on_epoch and e.epoch_value is None and e.updates)
            for e in self.entries.values()
        )

    # ------------------------------------------------------------- reading
    def step_metrics(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(callback, log, progress bar) values of the current step.

        The progress bar's stay tensors: they are turned into floats where a bar is drawn or an update
        leaves the process, a few times a second, not at every step (on a GPU each float() waits for it).
        """
        callback: dict[str, Tensor] = {}
        log: dict[str, Tensor] = {}
        pbar: dict[str, Tensor] = {}
        for entry in self.entries.values():
            if not entry.on_step or entry.step_value is None or not entry.step_synced:
                continue
            value = entry.step_value
            if value.requires_grad:  # logged with enable_graph=True
                value = value.detach()
            # Converted here, where values are read, not at each self.log: the logging path stays as cheap.
            # A Metric's values are left as they are, as in Lightning.
            if value.dtype not in _READ_DTYPES and not entry.is_metric:
                value = value.to(_default_float_dtype())
            key = entry.step_key()
            if entry.logger:
                log[key] = value
            if self.training:
                callback[entry.name] = value
                callback[key] = value
            if entry.prog_bar:
                pbar[key] = value
        return callback, log, pbar

    def epoch_metrics(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
        """(callback, log, progress bar) values of the epoch, reducing whatever is pending.

        It may be read again after more values are logged (an epoch-end hook's): only those are reduced then.
        """
        self.compute_epoch()
        callback: dict[str, Tensor] = {}
        log: dict[str, Tensor] = {}
        pbar: dict[str, float] = {}
        for entry in self.entries.values():
            if not entry.on_epoch or entry.epoch_value is None:
                continue
            value = entry.epoch_value
            key = entry.epoch_key()
            if entry.logger:
                log[key] = value
            callback[entry.name] = value
            callback[key] = value
            if entry.prog_bar:
                pbar[key] = float(value)
        return callback, log, pbar

    def epoch_keys_by_dataloader(self) -> dict[str, int | None]:
        """Epoch log key -> the dataloader it was logged from (None for epoch-level hooks)."""
        return {e.epoch_key(): e.dataloader_idx for e in self.entries.values() if e.on_epoch and e.logger}

    def reset(self) -> None:
        """Start a new epoch: drop accumulators, reset the logged Metrics, keep nothing."""
        self.reset_metrics()
        self.entries.clear()
        self._validated.clear()
        self._batch = None
        self._batch_size = None

    def reset_metrics(self) -> None:
        """Reset the torchmetrics Metrics logged since the last call (an evaluation pass does at its end)."""
        for entry in self.entries.values():
            if entry.metric is not None:
                entry.metric.reset()
                entry.metric = None  # reset once: it may be updated again before this collector is reset

    # ------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Epoch accumulators (a mid-epoch resume reports the same epoch means) and the last step's values.

        Not a logged Metric's: its states are the Metric's own (in the module's state_dict if persistent).
        """
        return {
            f"{fx}.{e.name}": {
                "fx": fx,
                "name": e.name,
                "base": e.base,
                "suffix": e.suffix,
                "on_step": e.on_step,
                "on_epoch": e.on_epoch,
                "prog_bar": e.prog_bar,
                "logger": e.logger,
                "reduce_fx": e.reduce_fx,
                "sync": e.sync,
                "total": float(e.total),
                "weight": e.weight,
                "updates": e.updates,
                # the step's value, so a resume from on_train_batch_end can still log that step's row
                "step_value": e.step_value.detach().cpu() if e.step_value is not None and e.step_synced else None,
            }
            for (fx, _), e in self.entries.items()
            if not e.is_metric
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._validated.clear()
        # Checkpoints from before entries were kept per hook name only the metric; training_step logs most.
        self.entries = {
            (s.get("fx", "training_step"), s.get("name", name)): _Entry(
                s.get("name", name),
                s.get("base", name),
                s.get("suffix", ""),
                None,
                s["on_step"],
                s["on_epoch"],
                s["prog_bar"],
                s["logger"],
                s["reduce_fx"],
                s["sync"] and self._gather is not None,
                total=s["total"],
                weight=s["weight"],
                updates=s["updates"],
                step_value=s.get("step_value"),
            )
            for name, s in state.items()
        }


def _reduce_name(reduce_fx: Any, name: str) -> str:
    if callable(reduce_fx):
        reduce_fx = getattr(reduce_fx, "__name__", str(reduce_fx))
    reduce_fx = str(reduce_fx).lower()
    if reduce_fx == "avg":
        reduce_fx = "mean"
    if reduce_fx not in _REDUCTIONS:
        raise MisconfigurationError(
            f"self.log({name!r}, reduce_fx={reduce_fx!r}) is not supported; use one of 'mean', 'sum', 'max', 'min'"
        )
    return reduce_fx


def _to_scalar_tensor(name: str, value: Any, enable_graph: bool) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (Tensor, int, float)):
        if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
            value = float(value)
        else:
            raise MisconfigurationError(
                f"self.log({name!r}, value) needs a number, a one-element tensor or a torchmetrics Metric, got "
                f"{type(value).__name__}: {value!r:.80}; use self.log_dict for dicts and log each metric separately"
            )
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise MisconfigurationError(
                f"self.log({name!r}, tensor) needs a one-element tensor, got shape {tuple(value.shape)}; "
                "reduce it first (e.g. .mean())"
            )
        tensor = value if enable_graph else value.detach()
        return tensor.reshape(())
    return torch.tensor(float(value), dtype=torch.float32)


def _torchmetrics_class(name: str) -> type | None:
    """torchmetrics' class ``name`` if the user's code has imported torchmetrics (else none of its objects exist)."""
    torchmetrics = sys.modules.get("torchmetrics")
    return getattr(torchmetrics, name, None) if torchmetrics is not None else None


def _torchmetrics_metric(name: str, value: Any) -> Any:
    """``value`` if it is a torchmetrics Metric, else None; raises for a MetricCollection."""
    collection = _torchmetrics_class("MetricCollection")
    if collection is not None and isinstance(value, collection):
        raise MisconfigurationError(
            f"self.log({name!r}, value) was given a MetricCollection ({', '.join(value.keys())}), which holds several "
            f"values; log it with self.log_dict(collection), which logs each Metric under its own name"
        )
    metric = _torchmetrics_class("Metric")
    return value if metric is not None and isinstance(value, metric) else None


def metric_collection_items(dictionary: Any) -> Any:
    """``self.log_dict``'s items: a MetricCollection's Metrics under their prefixed names, else ``.items()``.

    The Metrics of a compute group keep sharing their states (no copy at every call), as in Lightning.
    """
    collection = _torchmetrics_class("MetricCollection")
    if collection is not None and isinstance(dictionary, collection):
        return dictionary.items(keep_base=False, copy_state=False)
    return dictionary.items()


def _metric_value(name: str, metric: Any, value: Any, source: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise MisconfigurationError(
            f"self.log({name!r}, {type(metric).__name__}): its {source} gave {value!r:.80}, not a one-element tensor; "
            "log a Metric that computes one number (e.g. with average='macro'), or log its values one by one"
        )
    return value.detach()


def _default_float_dtype() -> torch.dtype:
    """Lightning's dtype for logged values: the default float dtype, but no narrower than float32."""
    dtype = torch.get_default_dtype()
    return dtype if dtype in _READ_DTYPES else torch.float32


def _reduce_rows(gathered: Tensor, reduce_fx: str) -> Tensor:
    """Reduce ``[world, k]`` over the ranks: ``[k]``."""
    if reduce_fx == "mean":
        return gathered.mean(0)
    if reduce_fx == "sum":
        return gathered.sum(0)
    if reduce_fx == "max":
        return gathered.amax(0)
    return gathered.amin(0)
