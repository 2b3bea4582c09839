"""self.log semantics: per-hook on_step/on_epoch defaults, _step/_epoch keys, reductions, batch-size weighting.

The logged values depend only on the batch contents and batch_idx (not on the
weights), so a difference here is a logging difference, not an optimization one.
Both sides get a recording logger and ``log_every_n_steps=1``, so
``logged_metrics`` means the same on both (Lightning only fills it when a
logger is attached).
"""

from __future__ import annotations

import pytest
import torch

from tests.parity.bodies import Regressor
from tests.parity.harness import (
    as_float,
    assert_fit_parity,
    assert_same_counters,
    assert_same_metrics,
    callback_class,
    loader,
    recording_logger,
    run_both,
)


class LogProbe(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = super().training_step(batch, batch_idx)  # logs "train_loss" with the defaults (step only)
        ym = y.mean()
        self.log("t_default", ym)
        self.log("t_forked", ym, on_step=True, on_epoch=True)
        self.log("t_epoch_mean", ym, on_step=False, on_epoch=True)  # weighted by the batch size (last batch: 2)
        self.log("t_sum", ym, on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("t_max", ym, on_step=False, on_epoch=True, reduce_fx="max")
        self.log("t_min", ym, on_step=True, on_epoch=True, reduce_fx="min")
        self.log("t_explicit_bs", ym, on_step=False, on_epoch=True, batch_size=batch_idx + 1)
        self.log("t_int", batch_idx, on_epoch=True)
        self.log("t_not_logged", ym, logger=False, on_epoch=True)
        self.log("t_bar", x.mean(), prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict({"t_dict_a": x.std(), "t_dict_b": float(batch_idx)}, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("tbe_default", outputs["loss"].detach() * 0 + batch_idx)

    def on_train_epoch_end(self):
        self.log("tee_default", float(self.current_epoch) + 0.5)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        super().validation_step(batch, batch_idx)  # "val_loss", defaults (epoch only)
        ym = y.mean()
        self.log("v_default", ym)
        self.log("v_forked", ym, on_step=True)
        self.log("v_sum", ym, reduce_fx="sum")
        self.log("v_max", ym, reduce_fx="max", prog_bar=True)
        self.log("v_step_only", ym, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self):
        self.log("vee_default", 1.0 + self.current_epoch)


class MetricSnapshots:
    """Records what a callback sees in trainer.callback_metrics at the moments callbacks read them."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[tuple[str, int, dict[str, float]]] = []

    def _take(self, trainer, where):
        metrics = {k: as_float(v) for k, v in trainer.callback_metrics.items()}
        self.snapshots.append((where, trainer.global_step, metrics))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(trainer, "on_train_batch_end")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._take(trainer, "on_validation_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self._take(trainer, "on_train_epoch_end")


VARIANTS = {
    "plain": dict(max_epochs=2),
    "accumulate-2": dict(max_epochs=2, accumulate_grad_batches=2),
    "val-twice-per-epoch": dict(max_epochs=2, val_check_interval=0.5),
}


def _run(tmp_path, variant):
    return run_both(
        LogProbe,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(VARIANTS[variant], num_sanity_val_steps=0),
        callbacks=lambda side: [callback_class(MetricSnapshots, side)()],
        with_logger=True,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_log_final_metrics(tmp_path, variant):
    pl_run, rl_run = _run(tmp_path, variant)
    assert_fit_parity(pl_run, rl_run, logged=True, progress_bar=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_log_metrics_seen_by_callbacks(tmp_path, variant):
    pl_run, rl_run = _run(tmp_path, variant)
    expected, actual = pl_run.callbacks[0].snapshots, rl_run.callbacks[0].snapshots
    assert [s[:2] for s in actual] == [s[:2] for s in expected]
    for (where, step, exp), (_, _, act) in zip(expected, actual):
        assert_same_metrics(exp, act, f"callback_metrics in {where} at global_step {step}")


@pytest.mark.parametrize("variant", ["plain", "val-twice-per-epoch"])
def test_callbacks_see_training_values_during_validation_without_a_logger(tmp_path, variant):
    # No logger and the default log_every_n_steps (50, more than an epoch here): the validation that runs
    # inside fit still lets its callbacks (EarlyStopping, ModelCheckpoint, a user's) read this step's
    # training values, as in Lightning.
    pl_run, rl_run = run_both(
        LogProbe,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(VARIANTS[variant], num_sanity_val_steps=0),
        callbacks=lambda side: [callback_class(MetricSnapshots, side)()],
    )
    expected = [s for s in pl_run.callbacks[0].snapshots if s[0] == "on_validation_end"]
    actual = [s for s in rl_run.callbacks[0].snapshots if s[0] == "on_validation_end"]
    assert [s[:2] for s in actual] == [s[:2] for s in expected] and expected
    for (where, step, exp), (_, _, act) in zip(expected, actual):
        assert "train_loss" in act, f"{where} at global_step {step}: {sorted(act)}"
        assert_same_metrics(exp, act, f"callback_metrics in {where} at global_step {step}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logger_rows(tmp_path, variant):
    # The "epoch" key Lightning adds to logger rows is not compared (a known, intentional difference).
    pl_run, rl_run = _run(tmp_path, variant)
    strip = lambda rows: [(step, {k: v for k, v in row.items() if k != "epoch"}) for step, row in rows]  # noqa: E731
    expected, actual = strip(pl_run.logger.rows), strip(rl_run.logger.rows)
    assert [(s, sorted(r)) for s, r in actual] == [(s, sorted(r)) for s, r in expected]
    for (step, exp), (_, act) in zip(expected, actual):
        assert_same_metrics(exp, act, f"logger row at step {step}")


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluate_after_fit_on_the_same_trainer(tmp_path, stage):
    # After fit, trainer.validate/test on the same Trainer still see the fitted epoch/step counters (the
    # module logs current_epoch in on_validation_epoch_end), and callback_metrics hold the new epoch values.
    pl_run, rl_run = _run(tmp_path, "plain")
    data = loader(n=10, seed=99)
    for run in (pl_run, rl_run):
        run.result = getattr(run.trainer, stage)(run.model, dataloaders=data, verbose=False)
    assert_same_counters(pl_run, rl_run)
    assert_same_metrics(
        pl_run.trainer.callback_metrics, rl_run.trainer.callback_metrics, f"callback_metrics after {stage}"
    )
    assert len(rl_run.result) == len(pl_run.result) == 1
    assert_same_metrics(pl_run.result[0], rl_run.result[0], f"{stage}() result")


def _rows_of(run, stage, **kwargs):
    """The logger rows ``trainer.<stage>(...)`` adds, as (step, {key: value}), and its result."""
    before = len(run.logger.rows)
    run.result = getattr(run.trainer, stage)(run.model, dataloaders=loader(n=10, seed=99), verbose=False, **kwargs)
    return run.logger.rows[before:]


def _assert_same_rows(expected, actual, what):
    """Same steps, keys and values; "epoch" is compared only where Lightning adds it (raylight adds it to every row)."""
    strip = lambda rows: [(step, {k: v for k, v in row.items() if k != "epoch"}) for step, row in rows]  # noqa: E731
    assert [(s, sorted(r)) for s, r in strip(actual)] == [(s, sorted(r)) for s, r in strip(expected)], what
    for (step, exp), (_, act) in zip(expected, actual):
        assert_same_metrics(exp, {k: v for k, v in act.items() if k in exp}, f"{what}: row at step {step}")


@pytest.mark.parametrize("ckpt_path", [None, "best"])
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluate_after_fit_logs_at_the_fits_last_step_and_keeps_its_counters(tmp_path, stage, ckpt_path):
    # The best checkpoint is the first epoch's (vee_default is 1 + current_epoch), so taking its epoch and step
    # (1, 6) instead of keeping the fitted ones (2, 12) would show.
    pl_run, rl_run = run_both(
        LogProbe,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=True),
        callbacks=lambda side: [side.ModelCheckpoint(monitor="vee_default", mode="min")],
        with_logger=True,
    )
    assert "epoch=0" in rl_run.trainer.checkpoint_callback.best_model_path
    expected, actual = (_rows_of(run, stage, ckpt_path=ckpt_path) for run in (pl_run, rl_run))
    assert (pl_run.trainer.current_epoch, pl_run.trainer.global_step) == (2, 12)
    assert_same_counters(pl_run, rl_run)
    assert {step for step, row in expected if "epoch" in row} == {12}  # epoch rows: after the fit's last step
    _assert_same_rows(expected, actual, f"{stage}(ckpt_path={ckpt_path!r}) logger rows")
    assert_same_metrics(pl_run.result[0], rl_run.result[0], f"{stage}() result")


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluate_a_checkpoint_on_a_fresh_trainer(tmp_path, stage):
    """No fit on this Trainer: epoch and step stay 0 (not the checkpoint's) and rows are logged at step 0."""
    fitted = run_both(
        LogProbe,
        tmp_path=tmp_path,
        trainer_args=dict(max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=True),
        callbacks=lambda side: [side.ModelCheckpoint(save_last=True)],
    )
    rows = []
    for run in fitted:
        logger = recording_logger(run.side)
        run.trainer = run.side.trainer(str(tmp_path / f"{run.side.name}-fresh"), logger=[logger])
        run.logger = logger
        rows.append(_rows_of(run, stage, ckpt_path=run.callbacks[0].last_model_path))
    pl_run, rl_run = fitted
    assert (pl_run.trainer.current_epoch, pl_run.trainer.global_step) == (0, 0)
    assert_same_counters(pl_run, rl_run)
    assert {step for step, row in rows[0] if "epoch" in row} == {0}
    _assert_same_rows(*rows, f"{stage}(ckpt_path=...) logger rows")
    assert_same_metrics(pl_run.result[0], rl_run.result[0], f"{stage}() result")


class ScheduledRegressor(Regressor):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        step = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": step, "interval": self.interval}}

    def __init__(self, interval: str = "step") -> None:
        super().__init__()
        self.interval = interval


@pytest.mark.parametrize("logging_interval", [None, "step", "epoch"])
@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_learning_rate_monitor_rows(tmp_path, logging_interval, interval):
    pl_run, rl_run = run_both(
        ScheduledRegressor,
        tmp_path=tmp_path,
        init_args={"interval": interval},
        trainer_args=dict(max_epochs=2),
        callbacks=lambda side: [
            side.LearningRateMonitor(logging_interval=logging_interval, log_momentum=True, log_weight_decay=True)
        ],
        with_logger=True,
    )
    lr_rows = lambda rows: [  # noqa: E731
        (step, {k: round(v, 9) for k, v in row.items() if k.startswith(("lr-", "momentum", "weight_decay"))})
        for step, row in rows
        if any(k.startswith("lr-") for k in row)
    ]
    assert lr_rows(rl_run.logger.rows) == lr_rows(pl_run.logger.rows)
    assert {k: [round(v, 9) for v in vs] for k, vs in rl_run.callbacks[0].lrs.items()} == {
        k: [round(v, 9) for v in vs] for k, vs in pl_run.callbacks[0].lrs.items()
    }


class SameNameTwoHooks(Regressor):
    """One name from two hooks: Lightning keeps each hook's values apart; the hook that logged it last is read."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("acc", float(batch_idx))  # per step
        return loss

    def on_train_epoch_end(self):
        self.log("acc", 42.0 + self.current_epoch)  # once per epoch, other options: not an error

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("v", float(batch_idx))

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.log("v", 10.0 + batch_idx)  # same options as validation_step's: not pooled with it


def test_one_name_logged_from_two_hooks(tmp_path):
    pl_run, rl_run = run_both(
        SameNameTwoHooks,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=2, num_sanity_val_steps=0),
        with_logger=True,
    )
    assert_fit_parity(pl_run, rl_run, logged=True)
    assert as_float(rl_run.trainer.callback_metrics["acc"]) == 43.0
    assert as_float(rl_run.trainer.callback_metrics["v"]) == pytest.approx(10.8)
    strip = lambda rows: [(step, {k: v for k, v in row.items() if k != "epoch"}) for step, row in rows]  # noqa: E731
    expected, actual = strip(pl_run.logger.rows), strip(rl_run.logger.rows)
    assert [(s, sorted(r)) for s, r in actual] == [(s, sorted(r)) for s, r in expected]
    for (step, exp), (_, act) in zip(expected, actual):
        assert_same_metrics(exp, act, f"logger row at step {step}")
