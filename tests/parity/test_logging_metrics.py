"""self.log of torchmetrics Metric objects, batch sizes inferred past string fields, and the dtype of step values.

A logged Metric's step value is its last ``forward`` value, its epoch value
``compute()`` at the epoch's end, after which it is reset; ``log_dict`` takes a
``MetricCollection``. Every test runs one module body under Lightning and
raylight with a recording logger and compares what a user reads: the logger's
rows, ``callback_metrics``, ``validate()``'s result and the Metric's own state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from runtime.errors import MisconfigurationError
from tests.parity.bodies import Regressor
from tests.parity.harness import PL, RL, as_float, assert_same_metrics, build_pair, loader, recording_logger, run_both

torchmetrics = pytest.importorskip("torchmetrics")

FIT = dict(max_epochs=2, num_sanity_val_steps=1)
TRAIN_AND_VAL = lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)}  # noqa: E731


def _strip_epoch(rows):
    """Logger rows without the "epoch" key (raylight adds it to every row; a known difference)."""
    return [(step, {k: v for k, v in row.items() if k != "epoch"}) for step, row in rows]


def assert_same_logging(pl_run, rl_run) -> None:
    """Same logger rows (steps, keys, values), callback_metrics and logged_metrics."""
    expected, actual = _strip_epoch(pl_run.logger.rows), _strip_epoch(rl_run.logger.rows)
    assert [(s, sorted(r)) for s, r in actual] == [(s, sorted(r)) for s, r in expected]
    for (step, exp), (_, act) in zip(expected, actual):
        assert_same_metrics(exp, act, f"logger row at step {step}")
    assert_same_metrics(pl_run.trainer.callback_metrics, rl_run.trainer.callback_metrics, "callback_metrics")
    assert_same_metrics(pl_run.trainer.logged_metrics, rl_run.trainer.logged_metrics, "logged_metrics")


def _metrics_of(module) -> dict:
    return {name: m for name, m in module.named_modules() if isinstance(m, torchmetrics.Metric)}


def assert_metrics_reset(run) -> None:
    """Every Metric of the module was reset when the loop ended (Lightning resets what it logged)."""
    counts = {name: m.update_count for name, m in _metrics_of(run.model).items()}
    assert counts and not any(counts.values()), f"{run.side}: Metric update counts after the run: {counts}"


# ------------------------------------------------------------------------------ 1. Metric objects
class ValMAE(Regressor):
    """The pattern Lightning's docs teach: update the Metric in the step, log the object."""

    def __init__(self):
        super().__init__()
        self.val_mae = torchmetrics.MeanAbsoluteError()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_mae(self(x), y)
        self.log("val_mae", self.val_mae, prog_bar=True)


def test_metric_logged_in_validation_step_validate(tmp_path):
    # 10 samples in batches of 4, 4, 2: compute() over all samples is not the mean of the batch values.
    pl_run, rl_run = run_both(
        ValMAE, tmp_path=tmp_path, method="validate", data=lambda: {"dataloaders": loader(n=10)}, with_logger=True
    )
    assert_same_logging(pl_run, rl_run)
    assert rl_run.result == [{"val_mae": pytest.approx(pl_run.result[0]["val_mae"], abs=1e-6)}]
    x, y = loader(n=10).dataset.tensors
    with torch.no_grad():
        mae = float((rl_run.model(x) - y).abs().mean())
    assert as_float(rl_run.trainer.callback_metrics["val_mae"]) == pytest.approx(mae)
    assert_metrics_reset(pl_run)
    assert_metrics_reset(rl_run)


def test_metric_logged_in_validation_step_during_fit(tmp_path):
    # The sanity check and each epoch's validation start from a reset Metric.
    pl_run, rl_run = run_both(ValMAE, tmp_path=tmp_path, data=TRAIN_AND_VAL, trainer_args=FIT, with_logger=True)
    assert_same_logging(pl_run, rl_run)
    assert_same_metrics(pl_run.trainer.progress_bar_metrics, rl_run.trainer.progress_bar_metrics, "progress bar")
    assert_metrics_reset(rl_run)


class TrainMetrics(Regressor):
    """Metrics logged from training_step: per step only (the default), per epoch only, and both."""

    def __init__(self):
        super().__init__()
        self.mae = torchmetrics.MeanAbsoluteError()
        self.mse = torchmetrics.MeanSquaredError()
        self.total = torchmetrics.SumMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = super().training_step(batch, batch_idx)
        preds = self(x).detach()
        self.mae(preds, y)
        self.mse(preds, y)
        self.total(y.sum())
        self.log("mae", self.mae)
        self.log("mse", self.mse, on_step=False, on_epoch=True, prog_bar=True)
        self.log("total", self.total, on_step=True, on_epoch=True, sync_dist=True, reduce_fx="max")
        return loss


def test_metric_step_and_epoch_values_in_training_step(tmp_path):
    pl_run, rl_run = run_both(TrainMetrics, tmp_path=tmp_path, trainer_args=dict(max_epochs=2), with_logger=True)
    assert_same_logging(pl_run, rl_run)
    assert_same_metrics(pl_run.trainer.progress_bar_metrics, rl_run.trainer.progress_bar_metrics, "progress bar")
    # reduce_fx does not apply to a Metric: the epoch value is compute(), the sum over the epoch's samples.
    y = loader(n=22).dataset.tensors[1]
    assert as_float(rl_run.trainer.callback_metrics["total_epoch"]) == pytest.approx(float(y.sum()), abs=1e-5)
    assert_metrics_reset(rl_run)


class _LogsAnMAE(Regressor):
    """training_step hands this step's predictions to ``log_mae``, which the bodies below write."""

    def __init__(self):
        super().__init__()
        self.mae = torchmetrics.MeanAbsoluteError()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = super().training_step(batch, batch_idx)
        self.log_mae(self(x).detach(), y)
        return loss


class UpdateWithoutForward(_LogsAnMAE):
    """on_step=True, but only update() runs: there is no forward() value to log per step."""

    def log_mae(self, preds, y):
        self.mae.update(preds, y)
        self.log("mae", self.mae, on_step=True, on_epoch=True)


def test_metric_updated_without_forward_logs_only_its_epoch_value(tmp_path):
    pl_run, rl_run = run_both(
        UpdateWithoutForward, tmp_path=tmp_path, trainer_args=dict(max_epochs=2), with_logger=True
    )
    assert_same_logging(pl_run, rl_run)
    assert "mae_step" not in rl_run.trainer.logged_metrics and "mae_epoch" in rl_run.trainer.logged_metrics


class OneMetricTwoNames(_LogsAnMAE):
    def log_mae(self, preds, y):
        self.mae(preds, y)
        self.log("mae_a", self.mae, on_step=True, on_epoch=True)
        self.log("mae_b", self.mae, on_step=True, on_epoch=True)


def test_one_metric_logged_under_two_names_gives_both_the_same_values(tmp_path):
    pl_run, rl_run = run_both(
        OneMetricTwoNames, tmp_path=tmp_path, trainer_args=dict(max_epochs=2), with_logger=True
    )
    assert_same_logging(pl_run, rl_run)
    metrics = rl_run.trainer.callback_metrics
    assert as_float(metrics["mae_a_epoch"]) == as_float(metrics["mae_b_epoch"])


class LogDictMetrics(Regressor):
    """log_dict of a MetricCollection (with a compute group: MSE and RMSE share their states) and of a dict."""

    def __init__(self):
        super().__init__()
        self.collection = torchmetrics.MetricCollection(
            {
                "mse": torchmetrics.MeanSquaredError(),
                "rmse": torchmetrics.MeanSquaredError(squared=False),
                "mae": torchmetrics.MeanAbsoluteError(),
            },
            prefix="val_",
        )
        self.explained = torchmetrics.ExplainedVariance()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = super().training_step(batch, batch_idx)
        self.explained(self(x).detach(), y)
        self.log_dict({"train_ev": self.explained, "train_loss_again": loss.detach()}, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.collection(self(x), y)
        self.log_dict(self.collection)


def test_log_dict_of_a_metric_collection_and_of_metrics(tmp_path):
    pl_run, rl_run = run_both(LogDictMetrics, tmp_path=tmp_path, data=TRAIN_AND_VAL, trainer_args=FIT, with_logger=True)
    assert_same_logging(pl_run, rl_run)
    metrics = rl_run.trainer.callback_metrics
    assert {"val_mse", "val_rmse", "val_mae", "train_ev_epoch"} <= set(metrics)
    assert as_float(metrics["val_rmse"]) == pytest.approx(as_float(metrics["val_mse"]) ** 0.5, rel=1e-5)
    assert_metrics_reset(rl_run)


class LogsACollection(LogDictMetrics):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.collection(self(x), y)
        self.log("val", self.collection)


def test_self_log_of_a_metric_collection_is_refused(tmp_path):
    plm, rlm = build_pair(LogsACollection)
    with pytest.raises(ValueError, match="MetricCollection"):
        PL.trainer(str(tmp_path / "pl")).validate(plm, loader(n=10), verbose=False)
    with pytest.raises(MisconfigurationError, match=r"self\.log\('val'.*MetricCollection.*self\.log_dict"):
        RL.trainer(str(tmp_path / "rl")).validate(rlm, loader(n=10), verbose=False)


# ------------------------------------------------------------------------------ 2. batch sizes
class TextDataset(Dataset):
    """(text, x, y) samples, or {"text", "x", "y"} dicts: the default collate makes the text field a list of str."""

    def __init__(self, n: int, as_dict: bool):
        data = loader(n=n).dataset
        self.x, self.y = data.tensors
        self.as_dict = as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        text = f"sample number {i}"  # longer than any batch: a string's length is not a batch size either
        return {"text": text, "x": self.x[i], "y": self.y[i]} if self.as_dict else (text, self.x[i], self.y[i])


@dataclasses.dataclass
class TextBatch:
    text: list
    x: torch.Tensor
    y: torch.Tensor


def _dataclass_collate(samples):
    texts, xs, ys = zip(*samples)
    return TextBatch(list(texts), torch.stack(xs), torch.stack(ys))


class TextRegressor(Regressor):
    def _xy(self, batch):
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        if isinstance(batch, TextBatch):
            return batch.x, batch.y
        return batch[1], batch[2]

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        self.log("t_idx", float(batch_idx), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.log("val_loss", F.mse_loss(self(x), y))
        self.log("v_idx", float(batch_idx))


@pytest.mark.parametrize("layout", ["tuple", "dict", "dataclass"])
def test_epoch_means_weight_batches_with_a_text_field_by_their_real_size(tmp_path, layout):
    # 10 samples in batches of 4, 4, 2: the mean of batch_idx weighted by the batch sizes is 0.8 (1.0 unweighted).
    def data():
        def make():
            dataset = TextDataset(10, as_dict=layout == "dict")
            collate = _dataclass_collate if layout == "dataclass" else None
            return DataLoader(dataset, batch_size=4, collate_fn=collate)

        return {"train_dataloaders": make(), "val_dataloaders": make()}

    pl_run, rl_run = run_both(
        TextRegressor, tmp_path=tmp_path, data=data, trainer_args=dict(max_epochs=1, num_sanity_val_steps=0),
        with_logger=True,
    )
    assert_same_logging(pl_run, rl_run)
    assert as_float(rl_run.trainer.callback_metrics["v_idx"]) == pytest.approx(0.8)
    assert as_float(rl_run.trainer.callback_metrics["t_idx"]) == pytest.approx(0.8)


# ------------------------------------------------------------------------------ 3. step value dtypes
class LogsIntegers(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = super().training_step(batch, batch_idx)
        self.log("positive", (y > 0).sum())  # int64
        self.log("any_big", (y.abs() > 2).any(), prog_bar=True)  # bool
        self.log("count", torch.tensor(batch_idx, dtype=torch.int32), on_step=True, on_epoch=True)
        self.log("half", loss.detach().to(torch.bfloat16))
        return loss


def test_integer_and_bool_step_values_are_read_as_float32(tmp_path):
    pl_run, rl_run = run_both(LogsIntegers, tmp_path=tmp_path, trainer_args=dict(max_epochs=1), with_logger=True)
    assert_same_logging(pl_run, rl_run)
    dtypes = lambda metrics: {k: v.dtype for k, v in metrics.items()}  # noqa: E731
    assert dtypes(rl_run.trainer.callback_metrics) == dtypes(pl_run.trainer.callback_metrics)
    assert dtypes(rl_run.trainer.logged_metrics) == dtypes(pl_run.trainer.logged_metrics)
    assert rl_run.trainer.callback_metrics["positive"].dtype == torch.float32
    assert_same_metrics(pl_run.trainer.progress_bar_metrics, rl_run.trainer.progress_bar_metrics, "progress bar")
