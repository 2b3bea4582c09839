"""Run the same module code under PyTorch Lightning (the oracle) and under raylight, and compare.

A test writes a module *body* once: a plain class whose methods are the
LightningModule's (``__init__`` calls ``super().__init__()`` first). The
harness mixes it with each side's base class::

    class Body:                       # module_class(Body, PL) -> class Body_lightning(Body, pl.LightningModule)
        def __init__(self, lr=0.1):   # module_class(Body, RL) -> class Body_raylight(Body, runtime.LightningModule)
            super().__init__()
            ...

Both modules start from the same weights and the same RNG state, see their
own (identical) DataLoaders, and run under a Trainer with the same loop
arguments. ``PL`` and ``RL`` hold what differs between the two sides.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger as PLLogger
from torch.utils.data import DataLoader, TensorDataset

import launcher
import runtime

ATOL = 1e-6

# Arguments that both Trainers are built with unless a test overrides them.
COMMON_TRAINER_ARGS: dict[str, Any] = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)


def _pl_trainer(root: str, **kwargs: Any) -> pl.Trainer:
    args = dict(COMMON_TRAINER_ARGS, accelerator="cpu", devices=1, enable_model_summary=False, default_root_dir=root)
    args.update(kwargs)
    return pl.Trainer(**args)


def _rl_trainer(root: str, **kwargs: Any) -> launcher.Trainer:
    # devices=1 is not passed: in raylight it is an alias for num_workers=1 (one Ray worker).
    args = dict(COMMON_TRAINER_ARGS, accelerator="cpu", num_workers=0, default_root_dir=root)
    args.update(kwargs)
    return launcher.Trainer(**args)


class Side:
    """What differs between the two sides (hashable by identity, so classes can be cached per side)."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)

    def __repr__(self) -> str:
        return self.name


PL = Side(
    name="lightning",
    Module=pl.LightningModule,
    Callback=pl.Callback,
    ModelCheckpoint=pl.callbacks.ModelCheckpoint,
    EarlyStopping=pl.callbacks.EarlyStopping,
    LearningRateMonitor=pl.callbacks.LearningRateMonitor,
    DataModule=pl.LightningDataModule,
    trainer=_pl_trainer,
)
RL = Side(
    name="raylight",
    Module=runtime.LightningModule,
    Callback=runtime.Callback,
    ModelCheckpoint=runtime.ModelCheckpoint,
    EarlyStopping=runtime.EarlyStopping,
    LearningRateMonitor=runtime.LearningRateMonitor,
    DataModule=runtime.LightningDataModule,
    trainer=_rl_trainer,
)
SIDES = (PL, RL)


@functools.cache
def module_class(body: type, side: Side) -> type:
    """``class <Body>_<side>(Body, side.Module)``, one class per (body, side) so classmethods see one type."""
    return type(f"{body.__name__}_{side.name}", (body, side.Module), {"__module__": body.__module__})


@functools.cache
def callback_class(body: type, side: Side) -> type:
    return type(f"{body.__name__}_{side.name}", (body, side.Callback), {"__module__": body.__module__})


def build_pair(body: type, *args: Any, seed: int = 0, **kwargs: Any) -> tuple[Any, Any]:
    """(lightning module, raylight module) built from ``body`` with identical initial weights."""
    torch.manual_seed(seed)
    plm = module_class(body, PL)(*args, **kwargs)
    torch.manual_seed(seed)
    rlm = module_class(body, RL)(*args, **kwargs)
    rlm.load_state_dict(plm.state_dict())
    return plm, rlm


# ---------------------------------------------------------------------------- data


def regression_dataset(n: int = 22, dim: int = 4, seed: int = 1234) -> TensorDataset:
    """``n`` samples of a noisy linear target; with batch_size 4 the last batch of 22 holds 2 samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 22, batch_size: int = 4, shuffle: bool = False, seed: int = 1234, dim: int = 4) -> DataLoader:
    return DataLoader(regression_dataset(n, dim, seed), batch_size=batch_size, shuffle=shuffle)


# --------------------------------------------------------------------------- loggers


class _RowRecorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.hparams: list[dict[str, Any]] = []

    def record(self, metrics: Mapping[str, Any], step: int) -> None:
        self.rows.append((int(step), {k: float(v) for k, v in metrics.items()}))


class PLRecordingLogger(PLLogger, _RowRecorder):
    """An in-memory Lightning logger: ``rows`` holds every ``(step, metrics)`` it received."""

    def __init__(self) -> None:
        PLLogger.__init__(self)
        _RowRecorder.__init__(self)

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.record(metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params) if isinstance(params, Mapping) else dict(vars(params)))


class RLRecordingLogger(_RowRecorder):
    """The same for raylight: a :class:`runtime.sinks.MetricsSink`."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.record(metrics, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.hparams.append(dict(params))

    def progress(self, update: Any) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


def recording_logger(side: Side) -> _RowRecorder:
    return PLRecordingLogger() if side is PL else RLRecordingLogger()


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    side: Side
    trainer: Any
    model: Any
    result: Any = None
    callbacks: list[Any] | None = None
    logger: _RowRecorder | None = None


def run_both(
    body: type,
    *,
    tmp_path,
    method: str = "fit",
    data: Callable[[], dict[str, Any]] | None = None,
    trainer_args: Mapping[str, Any] | None = None,
    callbacks: Callable[[Side], list[Any]] | None = None,
    with_logger: bool = False,
    init_args: Mapping[str, Any] | None = None,
    seed: int = 0,
    seed_fn: Callable[[Side, int], None] | None = None,
) -> tuple[Run, Run]:
    """Build the pair, then on each side seed the RNG identically and call ``trainer.<method>(model, **data())``.

    ``data`` returns fresh DataLoaders as keyword arguments of the method
    (default: ``train_dataloaders`` of :func:`loader`); ``callbacks(side)``
    builds each side's callbacks; ``with_logger`` attaches a recording logger;
    ``seed_fn(side, seed)`` replaces ``torch.manual_seed`` right before the call.
    """
    data = data or (lambda: {"train_dataloaders": loader()})
    plm, rlm = build_pair(body, seed=seed, **dict(init_args or {}))
    runs = []
    for side, model in ((PL, plm), (RL, rlm)):
        cbs = callbacks(side) if callbacks is not None else []
        extra = dict(trainer_args or {})
        logger = None
        if with_logger:
            logger = recording_logger(side)
            extra["logger"] = [logger]
            extra.setdefault("log_every_n_steps", 1)
        trainer = side.trainer(str(tmp_path / side.name), callbacks=cbs, **extra)
        if seed_fn is not None:
            seed_fn(side, seed + 1)
        else:
            torch.manual_seed(seed + 1)
        result = getattr(trainer, method)(model, **data())
        runs.append(Run(side, trainer, model, result, cbs, logger))
    return runs[0], runs[1]


# ------------------------------------------------------------------------ assertions


def as_float(value: Any) -> float:
    return float(value.detach().cpu()) if isinstance(value, torch.Tensor) else float(value)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = ATOL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), f"state_dict keys differ: lightning {sorted(sa)} vs raylight {sorted(sb)}"
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), atol=atol, rtol=0), (
            f"weight {key!r} differs (max abs diff {float((sa[key].float() - sb[key].float()).abs().max()):.3g}):\n"
            f"lightning {sa[key]}\nraylight  {sb[key]}"
        )


def assert_same_metrics(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str, atol: float = ATOL) -> None:
    """Same keys and values within ``atol`` (``expected`` is Lightning's)."""
    exp = {k: as_float(v) for k, v in expected.items()}
    act = {k: as_float(v) for k, v in actual.items()}
    assert sorted(exp) == sorted(act), (
        f"{what}: keys differ\n  only in lightning: {sorted(set(exp) - set(act))}\n"
        f"  only in raylight:  {sorted(set(act) - set(exp))}\n  lightning: {exp}\n  raylight:  {act}"
    )
    wrong = {
        k: (exp[k], act[k])
        for k in exp
        if not (math.isclose(exp[k], act[k], abs_tol=atol, rel_tol=0) or (math.isnan(exp[k]) and math.isnan(act[k])))
    }
    assert not wrong, f"{what}: values differ as {{key: (lightning, raylight)}}: {wrong}"


def assert_same_counters(pl_run: Run, rl_run: Run) -> None:
    assert (rl_run.trainer.global_step, rl_run.trainer.current_epoch) == (
        pl_run.trainer.global_step,
        pl_run.trainer.current_epoch,
    ), (
        f"(global_step, current_epoch): lightning ({pl_run.trainer.global_step}, {pl_run.trainer.current_epoch}), "
        f"raylight ({rl_run.trainer.global_step}, {rl_run.trainer.current_epoch})"
    )


def assert_fit_parity(pl_run: Run, rl_run: Run, *, logged: bool = False, progress_bar: bool = False) -> None:
    """Weights, step/epoch counters and callback_metrics (and optionally logged / progress-bar metrics)."""
    assert_same_weights(pl_run.model, rl_run.model)
    assert_same_counters(pl_run, rl_run)
    assert_same_metrics(pl_run.trainer.callback_metrics, rl_run.trainer.callback_metrics, "callback_metrics")
    if logged:
        assert_same_metrics(pl_run.trainer.logged_metrics, rl_run.trainer.logged_metrics, "logged_metrics")
    if progress_bar:
        assert_same_metrics(
            pl_run.trainer.progress_bar_metrics, rl_run.trainer.progress_bar_metrics, "progress_bar_metrics"
        )


def lrs(optimizers: list[Any]) -> list[float]:
    """The learning rate of every param group of every optimizer, in order."""
    return [group["lr"] for opt in optimizers for group in opt.param_groups]


def assert_same_sequence(expected: list[Any], actual: list[Any], what: str = "hook sequences") -> None:
    """Equal lists, reported as a unified diff (``-`` lightning only, ``+`` raylight only)."""
    if expected != actual:
        diff = "\n".join(difflib.unified_diff(
            [str(e) for e in expected], [str(a) for a in actual], "lightning", "raylight", lineterm="", n=2
        ))
        raise AssertionError(f"{what} differ ({len(expected)} in lightning, {len(actual)} in raylight):\n{diff}")
