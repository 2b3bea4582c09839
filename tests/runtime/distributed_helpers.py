"""Two-rank gloo runs for tests/runtime/test_distributed.py.

Ranks are started with ``torch.multiprocessing.start_processes`` (what
``torch.multiprocessing.spawn`` calls) using the ``forkserver`` method: as
with ``spawn`` each rank is a fresh process that shares no state with pytest,
but it is forked from a server that imported torch once, so a test pays well
under a second to start its ranks instead of the tens of seconds that two
concurrent ``import torch`` take on a busy two-core machine.

The function each rank runs is pickled, so every worker, module and dataset
here is a top-level name. A worker gets its rank and the test's directory,
runs the Engine, and writes what the test checks (weights, metrics, indices)
with ``torch.save``; the test process loads those files and asserts, so a
failed assertion never leaves a peer rank waiting in a collective.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from runtime import LightningModule, ModelCheckpoint, seed_everything
from runtime.config import RunConfig
from runtime.engine import Engine
from runtime.errors import DistributedSkipError, StepOutputError, WorldSizeChangedError

WORLD_SIZE = 2


# --------------------------------------------------------------------------- spawning
def _rank_main(
    rank: int, world_size: int, init_method: str, pg_timeout_s: float, fn: Callable[..., None], args: tuple
) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    # Two ranks share two cores: more intra-op threads only add contention.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=pg_timeout_s),
    )
    fn(rank, *args)
    # Only on success: tearing the group down after an error could block on the peer that is still in a collective.
    dist.destroy_process_group()


def _start_method() -> str:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    # Takes effect when the server starts (the first call); later calls change nothing. torch._dynamo is what
    # the first optimizer constructor imports lazily: several seconds that every rank would otherwise pay again.
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", __name__])
    return "forkserver"


def spawn(
    fn: Callable[..., None], tmp_path: Path, *args: Any, pg_timeout_s: float = 60.0, world_size: int = WORLD_SIZE
) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo ranks; raises ProcessRaisedException if a rank raised."""
    init_file = Path(tmp_path) / f"pg-init-{uuid.uuid4().hex}"
    mp.start_processes(
        _rank_main,
        args=(world_size, init_file.as_uri(), pg_timeout_s, fn, args),
        nprocs=world_size,
        join=True,
        start_method=_start_method(),
    )


def result_path(out_dir: str | Path, name: str, rank: int) -> Path:
    return Path(out_dir) / f"{name}-rank{rank}.pt"


def save_result(out_dir: str | Path, name: str, rank: int, obj: Any) -> None:
    torch.save(obj, result_path(out_dir, name, rank))


def load_results(out_dir: str | Path, name: str, world_size: int = WORLD_SIZE) -> list[Any]:
    """Every rank's result for ``name``, indexed by rank."""
    return [torch.load(result_path(out_dir, name, rank), weights_only=True) for rank in range(world_size)]


def floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class RecordingSink:
    """A MetricsSink that keeps every row it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.rows.append((int(step), {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params) -> None:
        pass

    def progress(self, update) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


# --------------------------------------------------------------------------- data
def regression_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def indexed_data(n: int) -> TensorDataset:
    """(index, features) pairs, so a step can tell which samples it got."""
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.arange(n), torch.randn(n, 4, generator=g))


# --------------------------------------------------------------------------- modules
class RegressionModule(LightningModule):
    """A tiny MLP regressor; ``dropout`` > 0 makes each step draw from the global RNG."""

    def __init__(self, dropout: float = 0.0, lr: float = 0.1, momentum: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1))
        self.lr = lr
        self.momentum = momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class IndexRecordingModule(LightningModule):
    """Records, per epoch, the dataset indices each training step received."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        idx, x = batch
        self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        idx, x = batch
        # One row per sample: its index, then a value computed from the sample.
        return torch.cat([idx.unsqueeze(1).to(x.dtype), 2 * x], dim=1)


def train_value(rank: int, batch_idx: int) -> float:
    """What ReductionsModule logs in training_step."""
    return 10.0 * rank + batch_idx + 1


def val_value(rank: int, batch_idx: int) -> float:
    """What ReductionsModule logs in validation_step."""
    return 100.0 + 10.0 * rank + batch_idx + 1


class ReductionsModule(LightningModule):
    """Logs a rank-dependent value with each reduce_fx (synced) and once unsynced."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        idx, x = batch
        value = self._on_device(train_value(self.global_rank, batch_idx))
        for fx in ("mean", "sum", "max", "min"):
            self.log(f"t_{fx}", value, on_step=True, on_epoch=True, reduce_fx=fx, sync_dist=True)
        self.log("t_local", value, on_step=True, on_epoch=True)
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        value = self._on_device(val_value(self.global_rank, batch_idx))
        for fx in ("mean", "sum", "max", "min"):
            self.log(f"v_{fx}", value, reduce_fx=fx, sync_dist=True)
        self.log("v_local", value)

    def _on_device(self, value: float) -> float | torch.Tensor:
        """On a GPU the value is logged as a tensor there, as a loss would be: the GPU accumulators' path."""
        return value if self.device.type == "cpu" else torch.full((), value, device=self.device)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ManyMetricsModule(LightningModule):
    """Logs ``num_metrics`` sync_dist metrics per training and validation step."""

    def __init__(self, num_metrics: int):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.num_metrics = num_metrics

    def training_step(self, batch, batch_idx):
        idx, x = batch
        for i in range(self.num_metrics):
            self.log(f"train_m{i}", float(i + self.global_rank), on_step=True, on_epoch=True, sync_dist=True)
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        for i in range(self.num_metrics):
            self.log(f"val_m{i}", float(i + self.global_rank), on_step=True, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FailingModule(RegressionModule):
    """Rank ``fail_rank`` raises in training_step at batch ``fail_batch``."""

    def __init__(self, fail_rank: int, fail_batch: int):
        super().__init__()
        self.fail_rank = fail_rank
        self.fail_batch = fail_batch

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.fail_rank and batch_idx == self.fail_batch:
            raise ValueError(f"deliberate failure on rank {self.global_rank} at batch {batch_idx}")
        return super().training_step(batch, batch_idx)


def quiet_config(out_dir: str | Path, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = dict(
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=str(out_dir)
    )
    settings.update(overrides)
    return RunConfig(**settings)


# --------------------------------------------------------------------------- 1. DDP equivalence
EQUIVALENCE_SAMPLES = 80
EQUIVALENCE_EPOCHS = 3


def equivalence_fit(
    out_dir: str | Path, batch_size: int, accumulate: int, accelerator: str = "cpu"
) -> tuple[dict[str, torch.Tensor], int]:
    """Fit a seeded RegressionModule without shuffling; returns (weights, global_step)."""
    torch.manual_seed(0)
    module = RegressionModule(lr=0.1)
    loader = DataLoader(regression_data(EQUIVALENCE_SAMPLES), batch_size=batch_size, shuffle=False)
    config = quiet_config(
        out_dir, max_epochs=EQUIVALENCE_EPOCHS, accumulate_grad_batches=accumulate, accelerator=accelerator
    )
    engine = Engine(config)
    engine.fit(module, loader)
    return cpu_state(module), engine.global_step


def equivalence_worker(rank: int, out_dir: str, accumulate_values: list[int], accelerator: str = "cpu") -> None:
    result = {}
    for accumulate in accumulate_values:
        weights, step = equivalence_fit(out_dir, batch_size=8, accumulate=accumulate, accelerator=accelerator)
        result[f"acc{accumulate}"] = {"weights": weights, "global_step": step}
    save_result(out_dir, "equivalence", rank, result)


# --------------------------------------------------------------------------- 2. sync_dist
REDUCTION_SAMPLES = 10  # 5 per rank: batches of 3 and 2, so batch-size weighting matters
REDUCTION_BATCH = 3


def reductions_worker(rank: int, out_dir: str, accelerator: str = "cpu") -> None:
    sink = RecordingSink()
    engine = Engine(quiet_config(out_dir, max_epochs=1, accelerator=accelerator), metrics_sink=sink)
    data = indexed_data(REDUCTION_SAMPLES)
    engine.fit(
        ReductionsModule(),
        DataLoader(data, batch_size=REDUCTION_BATCH, shuffle=False),
        DataLoader(data, batch_size=REDUCTION_BATCH, shuffle=False),
    )
    save_result(
        out_dir,
        "reductions",
        rank,
        {"callback_metrics": floats(engine.callback_metrics), "rows": sink.rows},
    )


COUNT_TRAIN_BATCHES = 3  # per rank
COUNT_VAL_BATCHES = 2  # per rank


class _CallCounter:
    def __init__(self, owner: Any, name: str):
        self.owner, self.name = owner, name
        self.original = getattr(owner, name)
        self.calls = 0
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.original(*args, **kwargs)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)


# Every collective the runtime can reach from Python; DDP's gradient all-reduce runs in its C++ reducer instead.
_COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "barrier", "all_gather_object", "broadcast_object_list")


def collective_count_worker(rank: int, out_dir: str, metric_counts: list[int]) -> None:
    result = {}
    data = indexed_data(2 * 4 * COUNT_TRAIN_BATCHES)
    val_data = indexed_data(2 * 4 * COUNT_VAL_BATCHES)
    for num_metrics in metric_counts:
        engine = Engine(quiet_config(out_dir, max_epochs=1))
        packed = _CallCounter(engine.strategy, "gather_packed")
        counters = {name: _CallCounter(dist, name) for name in _COLLECTIVES}
        try:
            engine.fit(
                ManyMetricsModule(num_metrics),
                DataLoader(data, batch_size=4, shuffle=False),
                DataLoader(val_data, batch_size=4, shuffle=False),
            )
        finally:
            packed.restore()
            for counter in counters.values():
                counter.restore()
        result[num_metrics] = {
            "gather_packed": packed.calls,
            "collectives": {name: c.calls for name, c in counters.items()},
            "callback_metrics": floats(engine.callback_metrics),
        }
    save_result(out_dir, "collectives", rank, result)


EPOCH_END_VAL_BATCHES = 2  # per rank


class EpochEndReaderModule(LightningModule):
    """Logs ``v = 100 * epoch + 10 * batch_idx + rank`` with sync_dist in validation_step (reduced mean:
    100 * epoch + 5.5) and records what on_validation_epoch_end reads, with the packed gathers counted so far."""

    def __init__(self, log_in_hook: bool):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.log_in_hook = log_in_hook
        self.counter: Any = None  # the _CallCounter on strategy.gather_packed
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch, batch_idx):
        idx, x = batch
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        value = float(100 * self.current_epoch + 10 * batch_idx + self.global_rank)
        self.log("v", value, sync_dist=True, prog_bar=True)
        self.log("v_local", value)  # not synced: each rank's own mean

    def on_validation_epoch_start(self):
        self.gathers_at_start = self.counter.calls

    def on_validation_epoch_end(self):
        self.seen.append({
            "callback": floats(self.trainer.callback_metrics),
            "progress_bar": dict(self.trainer.progress_bar_metrics),
            "gathers_before_hook": self.counter.calls - self.gathers_at_start,
        })
        if self.log_in_hook:
            self.log("hook_m", float(self.global_rank), sync_dist=True, prog_bar=True)

    def on_validation_end(self):
        self.seen[-1]["at_validation_end"] = floats(self.trainer.callback_metrics)
        self.seen[-1]["gathers"] = self.counter.calls - self.gathers_at_start

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def epoch_end_reads_worker(rank: int, out_dir: str) -> None:
    """What on_validation_epoch_end reads in fit (2 epochs) and validate(), with and without a hook-logged value."""
    result = {}
    val_data = indexed_data(2 * 4 * EPOCH_END_VAL_BATCHES)
    for log_in_hook in (False, True):
        for method in ("fit", "validate"):
            engine = Engine(quiet_config(out_dir, max_epochs=2))
            module = EpochEndReaderModule(log_in_hook)
            module.counter = _CallCounter(engine.strategy, "gather_packed")
            try:
                val = DataLoader(val_data, batch_size=4, shuffle=False)
                if method == "fit":
                    engine.fit(module, DataLoader(indexed_data(16), batch_size=4, shuffle=False), val)
                else:
                    engine.validate(module, val)
            finally:
                module.counter.restore()
            result[f"{method}-hook_logs={log_in_hook}"] = module.seen
    save_result(out_dir, "epoch_end_reads", rank, result)


DEFERRED_BATCHES = 10  # per rank
DEFERRED_LOG_EVERY = 4
DEFERRED_CKPT_EVERY = 5


class StepValueModule(LightningModule):
    """Logs ``m = 10 * batch_idx + rank`` with sync_dist each training step: the reduced mean is 10 * batch_idx + 0.5."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.seen: list[float | None] = []

    def training_step(self, batch, batch_idx):
        idx, x = batch
        self.log("m", float(10 * batch_idx + self.global_rank), sync_dist=True)
        return self.layer(x).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        value = self.trainer.callback_metrics.get("m")
        self.seen.append(None if value is None else float(value))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def deferred_sync_worker(rank: int, out_dir: str) -> None:
    sink = RecordingSink()
    checkpoint = ModelCheckpoint(
        dirpath=str(Path(out_dir) / "ckpt"), monitor="m", mode="max", every_n_train_steps=DEFERRED_CKPT_EVERY
    )
    engine = Engine(
        quiet_config(out_dir, max_epochs=1, log_every_n_steps=DEFERRED_LOG_EVERY, enable_checkpointing=True),
        metrics_sink=sink,
        callbacks=[checkpoint],
    )
    packed = _CallCounter(engine.strategy, "gather_packed")
    module = StepValueModule()
    try:
        engine.fit(module, DataLoader(indexed_data(2 * 4 * DEFERRED_BATCHES), batch_size=4, shuffle=False))
    finally:
        packed.restore()
    save_result(
        out_dir,
        "deferred",
        rank,
        {
            "seen": module.seen,
            "logged": [(step, row["m"]) for step, row in sink.rows if "m" in row],
            "gathers": packed.calls,
            "best_score": float(checkpoint.best_model_score),
            "callback_m": float(engine.callback_metrics["m"]),
        },
    )


# --------------------------------------------------------------------------- 3. sampler swap
SAMPLER_SAMPLES = 11  # odd: DistributedSampler pads one sample
SAMPLER_BATCH = 2
SAMPLER_EPOCHS = 3
SAMPLER_SEED = 1234


def sampler_worker(rank: int, out_dir: str) -> None:
    result = {}
    for use_distributed_sampler in (True, False):
        seed_everything(SAMPLER_SEED, verbose=False)
        module = IndexRecordingModule()
        engine = Engine(
            quiet_config(out_dir, max_epochs=SAMPLER_EPOCHS, use_distributed_sampler=use_distributed_sampler)
        )
        loader = DataLoader(indexed_data(SAMPLER_SAMPLES), batch_size=SAMPLER_BATCH, shuffle=True)
        engine.fit(module, loader)
        result[f"distributed={use_distributed_sampler}"] = {
            "seen": {int(epoch): list(indices) for epoch, indices in module.seen.items()},
            "num_training_batches": int(engine.num_training_batches),
        }
    save_result(out_dir, "sampler", rank, result)


# --------------------------------------------------------------------------- 4. exact resume
RESUME_SAMPLES = 40  # 20 per rank, batch 4: 5 batches per epoch
RESUME_BATCH = 4
RESUME_EPOCHS = 2
RESUME_EVERY_N_STEPS = 3


def resume_fit(out_dir: str | Path, ckpt_dir: str | Path, ckpt: str | None) -> Engine:
    seed_everything(42, verbose=False)
    module = RegressionModule(dropout=0.5, lr=0.05, momentum=0.9)
    engine = Engine(
        RunConfig(max_epochs=RESUME_EPOCHS, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=str(out_dir)),
        callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=RESUME_EVERY_N_STEPS, save_top_k=-1)],
    )
    loader = DataLoader(regression_data(RESUME_SAMPLES, seed=3), batch_size=RESUME_BATCH, shuffle=True)
    engine.fit(module, loader, ckpt=ckpt)
    return engine


def resume_full_worker(rank: int, out_dir: str, ckpt_dir: str) -> None:
    engine = resume_fit(out_dir, ckpt_dir, None)
    save_result(
        out_dir,
        "resume-full",
        rank,
        {"weights": cpu_state(engine.lightning_module), "global_step": engine.global_step},
    )


def resume_from_worker(rank: int, out_dir: str, ckpt_paths: list[str]) -> None:
    result = {}
    for i, path in enumerate(ckpt_paths):
        engine = resume_fit(out_dir, Path(out_dir) / f"resumed-ckpts-{i}", path)
        result[path] = {"weights": cpu_state(engine.lightning_module), "global_step": engine.global_step}
    save_result(out_dir, "resume-from", rank, result)


# --------------------------------------------------------------------------- 5. predict
PREDICT_BATCH = 3


class PlainValuePredictions(IndexRecordingModule):
    """Predictions as plain Python values: a list of ints, and a dict holding a list of strings."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        idx, _ = batch
        return {"ids": idx.tolist(), "labels": [f"sample-{i}" for i in idx.tolist()]}


def plain_predict_worker(rank: int, out_dir: str, n: int) -> None:
    engine = Engine(quiet_config(out_dir))
    predictions = engine.predict(PlainValuePredictions(), DataLoader(indexed_data(n), batch_size=PREDICT_BATCH))
    save_result(out_dir, "plain-predict", rank, predictions)


def predict_worker(rank: int, out_dir: str, sizes: list[int]) -> None:
    result = {}
    for n in sizes:
        engine = Engine(quiet_config(out_dir))
        predictions = engine.predict(IndexRecordingModule(), DataLoader(indexed_data(n), batch_size=PREDICT_BATCH))
        result[n] = [p.detach().cpu() for p in predictions]
    save_result(out_dir, "predict", rank, result)


# --------------------------------------------------------------------------- 6. a failing rank
FAIL_RANK = 1
FAIL_BATCH = 2


def failing_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)
    engine = Engine(quiet_config(out_dir, max_epochs=2))
    loader = DataLoader(regression_data(48), batch_size=4, shuffle=False)
    engine.fit(FailingModule(FAIL_RANK, FAIL_BATCH), loader)
    save_result(out_dir, "failing-finished", rank, {"global_step": engine.global_step})


# --------------------------------------------------------------------------- 7. resume on another world size
WS_SAMPLES = 24  # divisible by 1, 2 and 3 ranks: no DistributedSampler padding on any of them
WS_BATCH = 3  # 2 ranks: 4 batches per rank and epoch; 3 ranks: 3; 1 rank: 8
WS_EPOCHS = 2
WS_SEED = 7


def world_size_fit(out_dir: str | Path, shuffle: bool, callbacks: list, ckpt: str | None = None):
    """Fit an IndexRecordingModule; returns (engine, module). ``module.seen`` holds what this run trained on."""
    seed_everything(WS_SEED, verbose=False)
    module = IndexRecordingModule()
    engine = Engine(quiet_config(out_dir, max_epochs=WS_EPOCHS, enable_checkpointing=True), callbacks=callbacks)
    loader = DataLoader(indexed_data(WS_SAMPLES), batch_size=WS_BATCH, shuffle=shuffle)
    engine.fit(module, loader, ckpt=ckpt)
    return engine, module


def world_size_save_worker(rank: int, out_dir: str, shuffle: bool) -> None:
    """The uninterrupted run: a checkpoint after every step, and one at every epoch end."""
    callbacks = [
        ModelCheckpoint(dirpath=str(Path(out_dir) / "steps"), every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(dirpath=str(Path(out_dir) / "epochs"), every_n_epochs=1, save_top_k=-1),
    ]
    engine, module = world_size_fit(out_dir, shuffle, callbacks)
    save_result(out_dir, "ws-save", rank, {"seen": module.seen, "batches": int(engine.num_training_batches)})


def world_size_resume_worker(rank: int, out_dir: str, shuffle: bool, ckpts: dict[str, str]) -> None:
    """Resume from each checkpoint in turn; record what was trained on after resuming, or the refusal."""
    result = {}
    for name, path in ckpts.items():
        run_dir = Path(out_dir) / name
        try:
            engine, module = world_size_fit(run_dir, shuffle, [ModelCheckpoint(dirpath=str(run_dir))], ckpt=path)
        except WorldSizeChangedError as exc:
            # Every rank refuses at the same point, before any training: the next fit here starts cleanly.
            result[name] = {"error": str(exc)}
            continue
        result[name] = {
            "error": None,
            "seen": module.seen,
            "global_step": engine.global_step,
            "current_epoch": engine.current_epoch,
            "batches": int(engine.num_training_batches),
            "weights": cpu_state(module),
        }
    save_result(out_dir, "ws-resume", rank, result)


# --------------------------------------------------------------------------- 8. uneven training_step outputs
SKIP_SAMPLES = 32  # 16 per rank, batch 4: 4 batches per rank and epoch
SKIP_BATCH = 4
SKIP_BATCH_IDX = 2  # the batch whose training_step misbehaves (epoch 0, so also its global_step)


class SkippingModule(RegressionModule):
    """training_step returns ``output`` instead of the loss at batch SKIP_BATCH_IDX on ``ranks``."""

    def __init__(self, ranks: list[int], output: Any = None):
        super().__init__()
        self.ranks = ranks
        self.output = output

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == SKIP_BATCH_IDX and self.global_rank in self.ranks:
            return self.output
        return loss


def skip_fit(out_dir: str | Path, ranks: list[int], output: Any, batch_size: int) -> Engine:
    torch.manual_seed(0)
    engine = Engine(quiet_config(out_dir, max_epochs=1))
    loader = DataLoader(regression_data(SKIP_SAMPLES), batch_size=batch_size, shuffle=False)
    engine.fit(SkippingModule(ranks, output), loader)
    return engine


def skip_worker(rank: int, out_dir: str, ranks: list[int], output: Any) -> None:
    """Records the error a rank raised (its peers are left waiting in a collective), then re-raises it.

    The peers' all-reduce fails once the raising rank's process is gone (gloo), which ends the run as a
    real one would end; the test reads each rank's record.
    """
    try:
        engine = skip_fit(out_dir, ranks, output, SKIP_BATCH)
    except (DistributedSkipError, StepOutputError) as exc:
        save_result(out_dir, "skip", rank, {"error": type(exc).__name__, "message": str(exc)})
        raise
    save_result(
        out_dir,
        "skip",
        rank,
        {"error": None, "weights": cpu_state(engine.lightning_module), "global_step": engine.global_step},
    )


# --------------------------------------------------------------------------- manual optimization, two networks
class TwoNetworkModule(LightningModule):
    """GAN-shaped manual optimization: a critic step, then a generator step, each its own backward pass."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(4, 4)
        self.critic = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        gen_opt, critic_opt = self.optimizers()
        self.toggle_optimizer(critic_opt)  # the generator's parameters get no gradient here
        critic_loss = self.critic(x).pow(2).mean() + (self.critic(self.gen(x).detach()) - 1).pow(2).mean()
        self.manual_backward(critic_loss)
        critic_opt.step()
        critic_opt.zero_grad()
        self.untoggle_optimizer(critic_opt)
        self.toggle_optimizer(gen_opt)  # and the critic's none here
        gen_loss = self.critic(self.gen(x)).pow(2).mean()
        self.manual_backward(gen_loss)
        gen_opt.step()
        gen_opt.zero_grad()
        self.untoggle_optimizer(gen_opt)

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.1), torch.optim.SGD(self.critic.parameters(), lr=0.1)


TWO_NETWORK_SAMPLES = 64


def two_network_fit(out_dir: str | Path, batch_size: int, find_unused: bool) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    module = TwoNetworkModule()
    loader = DataLoader(regression_data(TWO_NETWORK_SAMPLES), batch_size=batch_size, shuffle=False)
    engine = Engine(quiet_config(out_dir, max_epochs=2, find_unused_parameters=find_unused))
    engine.fit(module, loader)
    return cpu_state(module), engine.global_step


def two_network_worker(rank: int, out_dir: str) -> None:
    weights, step = two_network_fit(out_dir, batch_size=8, find_unused=True)
    try:
        two_network_fit(out_dir, batch_size=8, find_unused=False)
        refused = None
    except RuntimeError as err:
        refused = str(err)
    save_result(out_dir, "two_network", rank, {"weights": weights, "global_step": step, "refused": refused})
