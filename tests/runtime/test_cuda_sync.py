"""On a GPU the CPU must run ahead: logging never makes a fit wait for the GPU step after step.

PyTorch's sync debug mode warns at every call that makes the CPU wait for the
GPU (``.item()``, ``float(tensor)``, a blocking copy). A fit's fixed costs
(moving the module, the end of the run) wait a fixed number of times; a wait
per step or per ``log_every_n_steps`` boundary would make a longer fit wait
more often, and cost the step's Python time that the GPU's queue would
otherwise hide (see ``tests/benchmarks/bench_gpu.py --sync-debug``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from runtime import LightningModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class LoggingRegressor(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_loss_synced", loss, sync_dist=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _syncs_in_fit(tmp_path, max_steps: int, enable_progress_bar: bool = False, **trainer_kwargs) -> int:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 16, generator=g), torch.randn(4096, 1, generator=g))
    # Pinned batches, as a GPU user sets them: from pageable memory the driver may wait for the stream while
    # it stages the copy, a wait that sync debug mode does not see.
    loader = DataLoader(data, batch_size=8, pin_memory=True)
    trainer = Trainer(
        num_workers=0, use_gpu=True, max_steps=max_steps, default_root_dir=str(tmp_path / str(max_steps)),
        enable_progress_bar=enable_progress_bar, enable_checkpointing=False, precision="bf16-mixed", **trainer_kwargs,
    )
    module = LoggingRegressor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(module, loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == max_steps
    return sum("synchroniz" in str(w.message) for w in caught)


def test_a_fit_without_loggers_waits_for_the_gpu_no_more_often_when_it_runs_longer(tmp_path):
    _syncs_in_fit(tmp_path, 10, logger=False)  # the process's first fit pays one-time waits (CUDA's set-up)
    short, long = _syncs_in_fit(tmp_path, 60, logger=False), _syncs_in_fit(tmp_path, 260, logger=False)
    # 200 more steps, four more log_every_n_steps boundaries: not one more wait. (Before the epoch
    # accumulators stayed on the GPU this was 65 against 264 on an H200: one wait per step.)
    assert long <= short, f"a 60-step fit waited for the GPU {short} times, a 260-step fit {long} times"


def test_the_progress_bar_waits_for_the_gpu_when_it_is_drawn_not_at_every_step(tmp_path):
    # The bar shows train_loss (prog_bar=True). Its value becomes a float when the bar is drawn, at most
    # 10 times a second, not at each step: 200 more steps must not cost anywhere near 200 more waits.
    _syncs_in_fit(tmp_path, 10, logger=False, enable_progress_bar=True)
    short = _syncs_in_fit(tmp_path, 60, logger=False, enable_progress_bar=True)
    long = _syncs_in_fit(tmp_path, 260, logger=False, enable_progress_bar=True)
    assert long - short < 50, f"a 60-step fit waited for the GPU {short} times, a 260-step fit {long} times"


def test_a_fit_with_a_logger_waits_once_per_logged_row(tmp_path):
    # The control: rows for a logger need the values on the CPU, so the count above can see a wait.
    short, long = _syncs_in_fit(tmp_path, 60), _syncs_in_fit(tmp_path, 260)
    assert long > short, f"a 60-step fit waited for the GPU {short} times, a 260-step fit {long} times"


class EpochReductions(LightningModule):
    """Logs a value made on the module's device (no host copy) with each reduce_fx, per epoch only."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        value = torch.full((), _value(batch_idx), device=self.device)
        for fx in ("mean", "sum", "max", "min"):
            self.log(f"v_{fx}", value, on_step=False, on_epoch=True, reduce_fx=fx)
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _value(batch_idx: int) -> float:
    return batch_idx % 7 - 2.5


def test_epoch_values_logged_on_the_gpu_are_reduced_like_the_cpu_ones(tmp_path):
    # 150 samples in batches of 8: 18 full batches and one of 6, so the mean must weight by batch size.
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(150, 16, generator=g), torch.randn(150, 1, generator=g))
    sizes = [8] * 18 + [6]
    values = [_value(i) for i in range(len(sizes))]
    expected = {
        "v_mean": sum(v * n for v, n in zip(values, sizes)) / sum(sizes),
        "v_sum": sum(values),
        "v_max": max(values),
        "v_min": min(values),
    }
    for use_gpu in (False, True):
        trainer = Trainer(
            num_workers=0, use_gpu=use_gpu, max_epochs=2, default_root_dir=str(tmp_path / f"gpu{use_gpu}"),
            logger=False, enable_progress_bar=False, enable_checkpointing=False,
        )
        trainer.fit(EpochReductions(), DataLoader(data, batch_size=8, pin_memory=use_gpu))
        got = {k: float(v) for k, v in trainer.callback_metrics.items()}
        assert got == pytest.approx(expected, rel=1e-6), f"use_gpu={use_gpu}"
