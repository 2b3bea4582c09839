"""User mistakes end in an exception that says what was wrong (the value) and how to fix it.

Each test runs a real ``fit`` in this process (``num_workers=0``) with one
mistake in it and checks the exception's type and the key phrases of its
message: the offending value or name, and the fix. Checkpoint tests also
check what a user would see on disk (which files exist, that a malicious
payload did not run).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from runtime import EarlyStopping, LightningModule, ModelCheckpoint, seed_everything
from runtime.callbacks import EarlyStoppingReason
from runtime.checkpoint.io import CheckpointError
from runtime.errors import MisconfigurationError, NonFiniteLossError, StepOutputError


# --------------------------------------------------------------------------- helpers


def _dataset(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    return DataLoader(_dataset(n), batch_size=batch_size)


def _trainer(tmp_path, **kwargs) -> Trainer:
    args = dict(
        num_workers=0,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    args.update(kwargs)
    return Trainer(**args)


class Net(LightningModule):
    """A small regression model; subclasses change one thing to make one mistake."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.l1 = nn.Linear(4, hidden)
        self.l2 = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _message(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------ training_step output


class ReturnsFloat(Net):
    def training_step(self, batch, batch_idx):
        return 0.25


class ReturnsString(Net):
    def training_step(self, batch, batch_idx):
        return "not-a-loss"


class ReturnsVector(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x) - y) ** 2  # shape (8, 1): forgot .mean()


class ReturnsDictWithoutLoss(Net):
    def training_step(self, batch, batch_idx):
        return {"total": self.loss(batch), "acc": torch.tensor(0.5)}


def test_training_step_returning_float_names_the_value_and_the_fix(tmp_path):
    with pytest.raises(StepOutputError) as excinfo:
        _trainer(tmp_path).fit(ReturnsFloat(), _loader())
    msg = _message(excinfo)
    assert "training_step" in msg
    assert "float" in msg and "0.25" in msg
    assert "loss tensor" in msg  # what to return instead
    assert "batch 0" in msg


def test_training_step_returning_string_names_the_value_and_the_fix(tmp_path):
    with pytest.raises(StepOutputError) as excinfo:
        _trainer(tmp_path).fit(ReturnsString(), _loader())
    msg = _message(excinfo)
    assert "training_step" in msg
    assert "str" in msg and "not-a-loss" in msg
    assert "loss tensor" in msg and "dict with a 'loss'" in msg


def test_training_step_returning_non_scalar_tensor_names_the_shape_and_the_fix(tmp_path):
    with pytest.raises(StepOutputError) as excinfo:
        _trainer(tmp_path).fit(ReturnsVector(), _loader())
    msg = _message(excinfo)
    assert "training_step" in msg
    assert "(8, 1)" in msg
    assert "scalar" in msg and ".mean()" in msg


def test_training_step_dict_without_loss_lists_its_keys_and_the_fix(tmp_path):
    with pytest.raises(StepOutputError) as excinfo:
        _trainer(tmp_path).fit(ReturnsDictWithoutLoss(), _loader())
    msg = _message(excinfo)
    assert "'loss'" in msg
    assert "'acc'" in msg and "'total'" in msg  # the keys it did return
    assert "put the loss tensor under 'loss'" in msg


# ----------------------------------------------------------------- optimizers


class PlateauWithoutMonitor(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}


class PlateauOnMissingMetric(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_acc"}}


def test_reduce_lr_on_plateau_without_monitor_says_where_to_put_it(tmp_path):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path).fit(PlateauWithoutMonitor(), _loader())
    msg = _message(excinfo)
    assert "ReduceLROnPlateau" in msg
    assert "'monitor'" in msg and "configure_optimizers" in msg


def test_reduce_lr_on_plateau_on_unlogged_metric_lists_logged_metrics(tmp_path):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path, max_epochs=2).fit(PlateauOnMissingMetric(), _loader(), _loader(16))
    msg = _message(excinfo)
    assert "'val_acc'" in msg  # what it monitors
    assert "train_loss" in msg and "val_loss" in msg  # what was logged
    assert "self.log('val_acc'" in msg  # the fix


class TwoOptimizers(Net):
    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.l1.parameters(), lr=0.05),
            torch.optim.SGD(self.l2.parameters(), lr=0.05),
        ]


def test_several_optimizers_with_automatic_optimization_point_to_manual_optimization(tmp_path):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path).fit(TwoOptimizers(), _loader())
    msg = _message(excinfo)
    assert "2 optimizers" in msg
    assert "self.automatic_optimization = False" in msg


class _HalvingScheduler:
    """A hand-written scheduler without state_dict()/load_state_dict()."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        for group in self.optimizer.param_groups:
            group["lr"] /= 2


class StatelessScheduler(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        return {"optimizer": opt, "lr_scheduler": _HalvingScheduler(opt)}


def test_a_scheduler_without_state_dict_is_refused_before_training_naming_it(tmp_path):
    model = StatelessScheduler()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MisconfigurationError, match=r"_HalvingScheduler has no state_dict\(\)/load_state_dict\(\)"):
        _trainer(tmp_path).fit(model, _loader())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "refused before any step"


class Manual(Net):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        opt.step()


def test_accumulate_grad_batches_with_manual_optimization_names_the_value_and_the_fix(tmp_path):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path, accumulate_grad_batches=2).fit(Manual(), _loader())
    msg = _message(excinfo)
    assert "accumulate_grad_batches=2" in msg
    assert "manual optimization" in msg and "automatic optimization" in msg


# ---------------------------------------------------------------- monitored callbacks


def test_model_checkpoint_on_unlogged_metric_after_validation_lists_available_metrics(tmp_path):
    ckpt = ModelCheckpoint(monitor="nope")
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path, callbacks=[ckpt]).fit(Net(), _loader(), _loader(16))
    msg = _message(excinfo)
    assert "ModelCheckpoint(monitor='nope')" in msg
    assert "Available metrics" in msg and "val_loss" in msg and "train_loss" in msg
    assert "self.log('nope'" in msg


def test_model_checkpoint_on_unlogged_metric_without_validation_warns_and_saves_no_top_k(tmp_path):
    # Without a validation pass the metric may just not exist yet (Lightning warns then, too).
    ckpt = ModelCheckpoint(monitor="nope", dirpath=str(tmp_path / "ckpts"))
    trainer = _trainer(tmp_path, callbacks=[ckpt])
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='nope'\).*Available metrics.*train_loss"):
        trainer.fit(Net(), _loader())
    assert ckpt.best_model_path == ""
    assert not os.path.exists(tmp_path / "ckpts") or os.listdir(tmp_path / "ckpts") == []


def test_early_stopping_strict_on_unlogged_metric_lists_available_metrics(tmp_path):
    stopper = EarlyStopping(monitor="nope")
    with pytest.raises(RuntimeError) as excinfo:
        _trainer(tmp_path, callbacks=[stopper], enable_checkpointing=False).fit(Net(), _loader(), _loader(16))
    msg = _message(excinfo)
    assert "EarlyStopping(monitor='nope')" in msg
    assert "Available metrics" in msg and "val_loss" in msg
    assert "strict=False" in msg


# ----------------------------------------------------------------------- self.log


class LogsVector(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("per_sample", ((self(x) - y) ** 2).squeeze(1))
        return self.loss(batch)


class LogsInConfigureOptimizers(Net):
    def configure_optimizers(self):
        self.log("lr", 0.05)
        return super().configure_optimizers()


class LogsInSetup(Net):
    def setup(self, stage):
        self.log("setup_metric", 1.0)


class LogsInOnFitStart(Net):
    def on_fit_start(self):
        self.log("fit_start_metric", 1.0)


class LogsMedian(Net):
    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, reduce_fx="median")
        return loss


def test_log_non_scalar_tensor_names_the_metric_shape_and_fix(tmp_path):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path).fit(LogsVector(), _loader())
    msg = _message(excinfo)
    assert "'per_sample'" in msg
    assert "(8,)" in msg
    assert "one-element tensor" in msg and ".mean()" in msg


@pytest.mark.parametrize(
    "model_cls, metric, hook",
    [
        (LogsInConfigureOptimizers, "lr", "configure_optimizers"),
        (LogsInSetup, "setup_metric", "setup"),
        # Lightning: "You can't `self.log()` inside `on_fit_start`"; the message must name the hook used.
        (LogsInOnFitStart, "fit_start_metric", "on_fit_start"),
    ],
)
def test_log_in_a_hook_that_may_not_log_says_where_to_log(tmp_path, model_cls, metric, hook):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path).fit(model_cls(), _loader())
    msg = _message(excinfo)
    assert f"self.log({metric!r}" in msg
    assert hook in msg
    assert "log from the step hooks" in msg


def test_log_with_unsupported_reduce_fx_lists_the_supported_ones(tmp_path):
    with pytest.raises(MisconfigurationError) as excinfo:
        _trainer(tmp_path).fit(LogsMedian(), _loader())
    msg = _message(excinfo)
    assert "reduce_fx='median'" in msg
    assert "'mean', 'sum', 'max', 'min'" in msg


# ------------------------------------------------------------------- checkpoints


def _train_and_save(tmp_path, model: LightningModule | None = None, name: str = "good.ckpt") -> str:
    seed_everything(0)
    model = model or Net()
    trainer = _trainer(tmp_path / "source", enable_checkpointing=False)
    trainer.fit(model, _loader())
    path = str(tmp_path / name)
    trainer.save_checkpoint(path)
    return path


def _truncate(path: str, keep: float = 0.5) -> str:
    with open(path, "rb") as f:
        data = f.read()
    bad = path.replace(".ckpt", "-truncated.ckpt")
    with open(bad, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return bad


def test_truncated_checkpoint_passed_to_fit_names_the_path(tmp_path):
    bad = _truncate(_train_and_save(tmp_path))
    with pytest.raises(CheckpointError) as excinfo:
        _trainer(tmp_path / "resume").fit(Net(), _loader(), ckpt_path=bad)
    msg = _message(excinfo)
    assert bad in msg
    assert "truncated or corrupt" in msg
    assert "previous checkpoint" in msg  # the fix
    assert "good.ckpt" in msg  # the intact neighbour it points to


def test_truncated_checkpoint_passed_to_load_from_checkpoint_names_the_path(tmp_path):
    bad = _truncate(_train_and_save(tmp_path))
    with pytest.raises(CheckpointError) as excinfo:
        Net.load_from_checkpoint(bad)
    msg = _message(excinfo)
    assert bad in msg
    assert "truncated or corrupt" in msg
    assert "previous checkpoint" in msg


class OtherArchitecture(LightningModule):
    """Renames one layer (missing/unexpected keys) and widens another (shape mismatch)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.l1 = nn.Linear(4, hidden * 2)
        self.head = nn.Linear(hidden * 2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.relu(self.l1(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _assert_architecture_message(msg: str, path: str) -> None:
    assert path in msg
    assert "does not match the model" in msg
    assert "missing key(s)" in msg and "head.weight" in msg and "head.bias" in msg
    assert "unexpected key(s)" in msg and "l2.weight" in msg and "l2.bias" in msg
    assert "shape mismatch" in msg and "l1.weight" in msg
    assert "(8, 4)" in msg and "(16, 4)" in msg  # checkpoint's shape and the model's
    assert "same hyperparameters" in msg  # the fix


def test_checkpoint_of_another_architecture_in_fit_lists_key_differences(tmp_path):
    path = _train_and_save(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        _trainer(tmp_path / "resume").fit(OtherArchitecture(), _loader(), ckpt_path=path)
    _assert_architecture_message(_message(excinfo), path)


def test_checkpoint_of_another_architecture_in_load_from_checkpoint_lists_key_differences(tmp_path):
    path = _train_and_save(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        OtherArchitecture.load_from_checkpoint(path)
    _assert_architecture_message(_message(excinfo), path)


def test_checkpoint_with_other_hyperparameters_names_shape_mismatches(tmp_path):
    path = _train_and_save(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        Net.load_from_checkpoint(path, hidden=16)
    msg = _message(excinfo)
    assert path in msg
    assert "l1.weight checkpoint (8, 4) vs model (16, 4)" in msg
    assert "l2.weight checkpoint (1, 8) vs model (1, 16)" in msg
    assert "missing key" not in msg and "unexpected key" not in msg


class _CreatesMarkerWhenUnpickled:
    """Unpickling this runs ``open(marker, "w")``: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_checkpoint(tmp_path, marker: str) -> str:
    good = torch.load(_train_and_save(tmp_path), weights_only=True)
    good["hyper_parameters"] = {"hidden": 8, "payload": _CreatesMarkerWhenUnpickled(marker)}
    path = str(tmp_path / "malicious.ckpt")
    torch.save(good, path)
    return path


def test_malicious_payload_runs_when_loaded_unsafely(tmp_path):
    # The control: the same file really does run code under a plain torch.load.
    marker = tmp_path / "control-marker"
    path = _malicious_checkpoint(tmp_path, str(marker))
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_from_checkpoint_refuses_pickled_payload_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path, str(marker))
    with pytest.raises(CheckpointError) as excinfo:
        Net.load_from_checkpoint(path)
    msg = _message(excinfo)
    assert path in msg
    assert "pickled Python objects" in msg and "NOT executed" in msg
    assert "open" in msg  # the global it asked for
    assert "re-save it with plain data only" in msg
    assert not marker.exists()


def test_fit_refuses_pickled_payload_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path, str(marker))
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as excinfo:
        _trainer(tmp_path / "resume").fit(model, _loader(), ckpt_path=path)
    msg = _message(excinfo)
    assert path in msg
    assert "pickled Python objects" in msg and "NOT executed" in msg
    assert not marker.exists()
    # Nothing was trained or loaded either.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fit_ckpt_path_last_without_any_checkpoint_warns_naming_the_directory_and_starts_fresh(tmp_path):
    # As in Lightning: a script may always pass "last"; the first run starts from the beginning.
    trainer = _trainer(tmp_path)
    with pytest.warns(UserWarning, match="no last checkpoint") as record:
        trainer.fit(Net(), _loader(), ckpt_path="last")
    msg = str(record[0].message)
    assert str(tmp_path) in msg and "none is loaded" in msg and "save_last=True" in msg
    assert trainer.global_step > 0


def test_fit_ckpt_path_last_with_run_name_names_the_run_checkpoint_directory(tmp_path):
    trainer = _trainer(tmp_path, run_name="exp1")
    with pytest.warns(UserWarning, match="no last checkpoint") as record:
        trainer.fit(Net(), _loader(), ckpt_path="last")
    assert os.path.join(str(tmp_path), "exp1", "checkpoints") in str(record[0].message)
    assert "any run under" not in str(record[0].message)


# ----------------------------------------------------------------- non-finite loss


class NanFromStep(Net):
    """The loss turns NaN once ``global_step`` reaches ``nan_step`` and stays NaN."""

    def __init__(self, nan_step: int = 3, nan_epoch: int | None = None):
        super().__init__()
        self.nan_step = nan_step
        self.nan_epoch = nan_epoch

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.nan_epoch is not None:
            bad = self.current_epoch >= self.nan_epoch
        else:
            bad = self.global_step >= self.nan_step
        if bad:
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss


_STEP_FILE = re.compile(r"step=(\d+)")


def test_fail_on_nonfinite_loss_raises_naming_the_step_and_writes_no_later_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(tmp_path, max_epochs=3, fail_on_nonfinite_loss=True, callbacks=[ckpt])
    model = NanFromStep(nan_step=3)
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.fit(model, _loader())  # 4 batches per epoch: step 3 is batch 3 of epoch 0
    msg = _message(excinfo)
    assert "nan" in msg
    assert "global step 3" in msg and "batch 3" in msg and "epoch 0" in msg
    assert "fail_on_nonfinite_loss=True" in msg
    assert "learning rate" in msg  # a fix
    saved = sorted(int(_STEP_FILE.search(name).group(1)) for name in os.listdir(ckpt_dir) if name.endswith(".ckpt"))
    assert saved == [1, 2, 3]
    # The newest checkpoint holds finite weights to resume from.
    last = torch.load(os.path.join(ckpt_dir, "epoch=0-step=3.ckpt"), weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # The failing step never reached the optimizer: the driver's model is still finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_with_early_stopping_check_finite_stops_like_lightning(tmp_path):
    # Lightning 2.6.6 with the same module, data and callback (checked by hand, not imported here: importing
    # lightning costs seconds) ends with should_stop=True, current_epoch=2, global_step=8, stopped_epoch=1 and
    # stopping_reason NON_FINITE_METRIC: epoch 0 is finite, epoch 1's loss is NaN, the check at its end stops.
    stopper = EarlyStopping(monitor="train_loss", check_finite=True, check_on_train_epoch_end=True)
    trainer = _trainer(tmp_path, max_epochs=5, callbacks=[stopper], enable_checkpointing=False)
    assert trainer.spec.fail_on_nonfinite_loss is False  # the default: no NonFiniteLossError
    trainer.fit(NanFromStep(nan_epoch=1), _loader())

    assert trainer.should_stop is True
    assert trainer.current_epoch == 2 < 5
    assert trainer.global_step == 8
    assert stopper.stopped_epoch == 1
    assert stopper.stopping_reason is EarlyStoppingReason.NON_FINITE_METRIC
    assert "train_loss" in stopper.stopping_reason_message and "not finite" in stopper.stopping_reason_message
    assert torch.isnan(trainer.callback_metrics["train_loss"])
