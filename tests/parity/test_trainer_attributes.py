"""Trainer attributes that module code (``self.trainer``) and scripts (``trainer`` after fit) read.

Every attribute is read with a fallback, so one missing name does not hide the others.
"""

from __future__ import annotations

import math

import torch

from tests.parity.bodies import Regressor
from tests.parity.harness import loader, lrs, run_both

MISSING = "<missing>"


def _plain(value):
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def _read(obj, names):
    return {name: _plain(getattr(obj, name, MISSING)) for name in names}


# What module code commonly reads from self.trainer while training and validating.
IN_TRAINING_STEP = (
    "current_epoch", "global_step", "is_last_batch", "num_training_batches", "num_val_batches", "max_epochs",
    "max_steps", "min_epochs", "min_steps", "estimated_stepping_batches", "sanity_checking", "training",
    "validating", "testing", "predicting", "should_stop", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "log_every_n_steps", "check_val_every_n_epoch", "val_check_interval",
    "limit_train_batches", "limit_val_batches", "world_size", "global_rank", "local_rank", "node_rank",
    "num_nodes", "num_devices", "is_global_zero", "fast_dev_run",
)
IN_VALIDATION_STEP = (
    "current_epoch", "global_step", "sanity_checking", "training", "validating", "num_val_batches",
    "num_sanity_val_batches", "num_sanity_val_steps",
)
# What a script commonly reads from its Trainer after fit (besides the metrics and counters tested elsewhere).
AFTER_FIT = (
    "num_training_batches", "num_val_batches", "max_epochs", "max_steps", "estimated_stepping_batches",
    "should_stop", "is_global_zero", "world_size", "global_rank", "sanity_checking", "training",
    "accumulate_grad_batches", "checkpoint_callback", "early_stopping_callback",
)


class AttributeProbe(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int, dict]] = []

    def training_step(self, batch, batch_idx):
        self.reads.append(("training_step", batch_idx, _read(self.trainer, IN_TRAINING_STEP)))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.reads.append(("validation_step", batch_idx, _read(self.trainer, IN_VALIDATION_STEP)))
        super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def _fit(tmp_path):
    return run_both(
        AttributeProbe,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=2, num_sanity_val_steps=1, accumulate_grad_batches=2, limit_train_batches=5),
    )


def _differences(expected: dict, actual: dict) -> dict:
    return {k: (expected[k], actual.get(k, MISSING)) for k in expected if actual.get(k, MISSING) != expected[k]}


def test_trainer_attributes_seen_by_the_module(tmp_path):
    pl_run, rl_run = _fit(tmp_path)
    expected, actual = pl_run.model.reads, rl_run.model.reads
    assert [r[:2] for r in actual] == [r[:2] for r in expected]
    wrong = {}
    for (hook, batch_idx, exp), (_, _, act) in zip(expected, actual):
        for name, pair in _differences(exp, act).items():
            wrong.setdefault(f"{hook}.{name}", []).append((batch_idx, *pair))
    lines = [f"  {k}: {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in sorted(wrong.items())]
    header = "self.trainer.<name> differs as {hook.name: [(batch_idx, lightning, raylight), ...]}:"
    assert not wrong, "\n".join([header, *lines])


def test_trainer_attributes_after_fit(tmp_path):
    pl_run, rl_run = _fit(tmp_path)
    expected, actual = _read(pl_run.trainer, AFTER_FIT), _read(rl_run.trainer, AFTER_FIT)
    expected["optimizers.lr"] = lrs(pl_run.trainer.optimizers)
    actual["optimizers.lr"] = lrs(rl_run.trainer.optimizers) if hasattr(rl_run.trainer, "optimizers") else MISSING
    expected["lr_scheduler_configs"] = [(c.interval, c.frequency) for c in pl_run.trainer.lr_scheduler_configs]
    actual["lr_scheduler_configs"] = (
        [(c.interval, c.frequency) for c in rl_run.trainer.lr_scheduler_configs]
        if hasattr(rl_run.trainer, "lr_scheduler_configs")
        else MISSING
    )
    expected["lightning_module is model"] = pl_run.trainer.lightning_module is pl_run.model
    actual["lightning_module is model"] = getattr(rl_run.trainer, "lightning_module", None) is rl_run.model
    assert not _differences(expected, actual), (
        "trainer.<name> after fit differs as {name: (lightning, raylight)}: " + repr(_differences(expected, actual))
    )


def _loaders(value):
    """What a trainer's *_dataloader(s) attribute holds: None, or each DataLoader's number of batches.

    Not its ``batch_size``: raylight's loader batches through a resumable batch sampler, so that attribute is None.
    """
    if value is None or value == MISSING:
        return value
    if isinstance(value, (list, tuple)):
        return [_loaders(v) for v in value]
    return len(value)


class DataloaderReads(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, dict] = {}

    def _read_loaders(self, when):
        names = ("train_dataloader", "val_dataloaders", "test_dataloaders", "predict_dataloaders")
        self.reads[when] = {name: _loaders(getattr(self.trainer, name, MISSING)) for name in names}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        super().test_step(batch, batch_idx)

    def on_train_start(self):
        self._read_loaders("on_train_start")

    def on_validation_start(self):
        self._read_loaders("on_validation_start")

    def on_test_start(self):
        self._read_loaders("on_test_start")

    def on_predict_start(self):
        self._read_loaders("on_predict_start")


def test_the_dataloaders_a_loop_runs_are_on_the_trainer(tmp_path):
    fit_data = lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, batch_size=5)}  # noqa: E731
    pl_fit, rl_fit = run_both(DataloaderReads, tmp_path=tmp_path / "fit", data=fit_data,
                              trainer_args={"max_epochs": 1, "num_sanity_val_steps": 0})
    assert rl_fit.model.reads == pl_fit.model.reads
    assert rl_fit.model.reads["on_train_start"] == {
        "train_dataloader": 6, "val_dataloaders": 2, "test_dataloaders": None, "predict_dataloaders": None
    }
    two = lambda: {"dataloaders": [loader(n=8), loader(n=12, batch_size=3)]}  # noqa: E731
    for method in ("validate", "test", "predict"):
        pl_run, rl_run = run_both(DataloaderReads, tmp_path=tmp_path / method, method=method, data=two)
        assert rl_run.model.reads == pl_run.model.reads, method
