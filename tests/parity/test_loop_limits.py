"""Loop arguments: max_steps, limit_*_batches, val_check_interval, check_val_every_n_epoch, sanity steps, fast_dev_run.

The module records every training batch and every validation pass as
``(event, epoch, batch_idx, global_step, sanity_checking)``, so the tests
compare *when* things ran, not just the final weights.
"""

from __future__ import annotations

import pytest

from tests.parity.bodies import Regressor
from tests.parity.harness import assert_fit_parity, loader, run_both


class LoopProbe(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def _event(self, name, batch_idx=None):
        self.events.append((name, self.current_epoch, batch_idx, self.global_step, self.trainer.sanity_checking))

    def training_step(self, batch, batch_idx):
        self._event("train", batch_idx)
        return super().training_step(batch, batch_idx)

    def on_validation_start(self):
        self._event("val_start")

    def validation_step(self, batch, batch_idx):
        self._event("val", batch_idx)
        super().validation_step(batch, batch_idx)

    def on_train_epoch_end(self):
        self._event("train_epoch_end")


def _train_val():
    # 6 training batches (last one of 2 samples), 3 validation batches (last one of 2 samples).
    return {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)}


def _run(tmp_path, **trainer_args):
    pl_run, rl_run = run_both(LoopProbe, tmp_path=tmp_path, data=_train_val, trainer_args=trainer_args)
    assert rl_run.model.events == pl_run.model.events, _event_diff(pl_run.model.events, rl_run.model.events)
    assert_fit_parity(pl_run, rl_run)
    return pl_run, rl_run


def _event_diff(expected, actual) -> str:
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e != a:
            head = f"first difference at event {i}: lightning {e}, raylight {a}"
            break
    else:
        head = f"lengths differ: lightning {len(expected)}, raylight {len(actual)}"
    return f"{head}\nlightning: {expected}\nraylight:  {actual}"


def test_max_steps_stops_mid_epoch(tmp_path):
    pl_run, _ = _run(tmp_path, max_epochs=5, max_steps=8)
    assert pl_run.trainer.global_step == 8


def test_max_steps_with_accumulation(tmp_path):
    _run(tmp_path, max_epochs=5, max_steps=3, accumulate_grad_batches=2)


@pytest.mark.parametrize("limit", [3, 0.5, 0.4], ids=["int-3", "float-0.5", "float-0.4"])
def test_limit_train_batches(tmp_path, limit):
    _run(tmp_path, max_epochs=2, limit_train_batches=limit)


@pytest.mark.parametrize("limit", [1, 0.5, 0], ids=["int-1", "float-0.5", "zero"])
def test_limit_val_batches(tmp_path, limit):
    _run(tmp_path, max_epochs=2, limit_val_batches=limit)


@pytest.mark.parametrize("interval", [2, 4, 0.5, 0.25], ids=["int-2", "int-4", "float-0.5", "float-0.25"])
def test_val_check_interval(tmp_path, interval):
    _run(tmp_path, max_epochs=2, val_check_interval=interval)


def test_val_check_interval_across_epochs(tmp_path):
    # check_val_every_n_epoch=None: val_check_interval counts batches over epoch boundaries.
    _run(tmp_path, max_epochs=3, val_check_interval=4, check_val_every_n_epoch=None)


def test_check_val_every_n_epoch(tmp_path):
    _run(tmp_path, max_epochs=4, check_val_every_n_epoch=2)


@pytest.mark.parametrize("steps", [0, 1, 2, -1])
def test_num_sanity_val_steps(tmp_path, steps):
    _run(tmp_path, max_epochs=1, num_sanity_val_steps=steps)


@pytest.mark.parametrize("fast_dev_run", [True, 3])
def test_fast_dev_run(tmp_path, fast_dev_run):
    pl_run, _ = _run(tmp_path, max_epochs=3, fast_dev_run=fast_dev_run)
    assert pl_run.trainer.global_step == int(fast_dev_run)


class StopsAtOnce(LoopProbe):
    """Asks the Trainer to stop in the first training step; ``min_epochs``/``min_steps`` must hold it back."""

    def training_step(self, batch, batch_idx):
        self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    "limits",
    [{"min_epochs": 3}, {"min_epochs": 2, "val_check_interval": 0.5}, {"min_steps": 9}, {"min_epochs": 1}],
    ids=["min_epochs", "min_epochs-mid-epoch-validation", "min_steps", "min_epochs-1"],
)
def test_a_stop_request_waits_for_min_epochs_and_min_steps(tmp_path, limits):
    pl_run, rl_run = run_both(StopsAtOnce, tmp_path=tmp_path, data=_train_val, trainer_args={"max_epochs": 6, **limits})
    assert rl_run.model.events == pl_run.model.events, _event_diff(pl_run.model.events, rl_run.model.events)
    assert_fit_parity(pl_run, rl_run)
    if "min_epochs" in limits:  # every required epoch ran in full
        assert rl_run.trainer.current_epoch == limits["min_epochs"], rl_run.trainer.current_epoch
