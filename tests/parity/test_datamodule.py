"""LightningDataModule: when its hooks run relative to the module's, its hparams, and the trained result."""

from __future__ import annotations

import pytest
import torch

from tests.parity.bodies import Regressor
from tests.parity.harness import (
    PL,
    RL,
    Run,
    assert_fit_parity,
    assert_same_sequence,
    build_pair,
    loader,
    module_class,
    recording_logger,
)

CALLS: list[str] = []


def _stage(stage) -> str:
    # Lightning passes a str-valued enum (f"{stage}" is "TrainerFn.FITTING" on Python 3.11+); compare the value.
    assert stage == str.__str__(stage)
    return str.__str__(stage)


class RecordingData:
    def __init__(self, batch_size: int = 4, n: int = 22) -> None:
        super().__init__()
        self.save_hyperparameters()

    def prepare_data(self):
        CALLS.append("datamodule.prepare_data")

    def setup(self, stage):
        CALLS.append(f"datamodule.setup:{_stage(stage)}")

    def teardown(self, stage):
        CALLS.append(f"datamodule.teardown:{_stage(stage)}")

    def train_dataloader(self):
        CALLS.append("datamodule.train_dataloader")
        return loader(n=self.hparams.n, batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        CALLS.append("datamodule.val_dataloader")
        return loader(n=10, seed=99)

    def test_dataloader(self):
        CALLS.append("datamodule.test_dataloader")
        return loader(n=10, seed=98)

    def predict_dataloader(self):
        CALLS.append("datamodule.predict_dataloader")
        return loader(n=10, seed=97)


class RecordingModule(Regressor):
    def prepare_data(self):
        CALLS.append("module.prepare_data")

    def setup(self, stage):
        CALLS.append(f"module.setup:{_stage(stage)}")

    def teardown(self, stage):
        CALLS.append(f"module.teardown:{_stage(stage)}")

    def on_fit_start(self):
        CALLS.append("module.on_fit_start")

    def on_train_start(self):
        CALLS.append("module.on_train_start")


_DM_CLASSES = {}


def _datamodule(side, **kwargs):
    if side.name not in _DM_CLASSES:
        _DM_CLASSES[side.name] = type(f"RecordingData_{side.name}", (RecordingData, side.DataModule), {})
    return _DM_CLASSES[side.name](**kwargs)


def test_datamodule_hparams():
    assert dict(_datamodule(RL, batch_size=3).hparams) == dict(_datamodule(PL, batch_size=3).hparams)


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_datamodule_hook_order_and_results(tmp_path, stage):
    plm, rlm = build_pair(RecordingModule)
    runs = {}
    for side, model in ((PL, plm), (RL, rlm)):
        trainer = side.trainer(str(tmp_path / side.name), max_epochs=2, num_sanity_val_steps=0)
        CALLS.clear()
        result = getattr(trainer, stage)(model, datamodule=_datamodule(side, batch_size=5))
        runs[side.name] = (list(CALLS), trainer, model, result)
    (pl_calls, pl_trainer, _, pl_result), (rl_calls, rl_trainer, _, rl_result) = runs["lightning"], runs["raylight"]
    assert_same_sequence(pl_calls, rl_calls)
    if stage == "fit":
        assert_fit_parity(Run(PL, pl_trainer, plm), Run(RL, rl_trainer, rlm))


class HparamsModule(Regressor):
    def __init__(self, lr: float = 0.05, batch_size: int = 4, log_hparams: bool = True) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters(logger=log_hparams)


class HparamsData:
    def __init__(self, batch_size: int = 4, n: int = 22, log_hparams: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(logger=log_hparams)

    def train_dataloader(self):
        return loader(n=self.hparams.n, batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return loader(n=8, seed=99)

    def test_dataloader(self):
        return loader(n=8, seed=98)

    def predict_dataloader(self):
        return loader(n=8, seed=97)


def _hparams_data(side, **kwargs):
    return type(f"HparamsData_{side.name}", (HparamsData, side.DataModule), {})(**kwargs)


def _logged_hparams(tmp_path, module_args, data_args, with_logger=True, stage="fit"):
    """{side name: the hparams dicts the side's logger received, or the exception ``trainer.<stage>`` raised}."""
    outcome = {}
    for side in (PL, RL):
        model = module_class(HparamsModule, side)(**module_args)
        data = _hparams_data(side, **data_args)
        logger = recording_logger(side)
        trainer = side.trainer(str(tmp_path / side.name), max_epochs=1, logger=[logger] if with_logger else False)
        try:
            getattr(trainer, stage)(model, datamodule=data)
            outcome[side.name] = logger.hparams
        except RuntimeError as err:
            outcome[side.name] = err
    return outcome


@pytest.mark.parametrize(
    "module_args, data_args, expected",
    [
        ({}, {}, {"lr": 0.05, "batch_size": 4, "log_hparams": True, "n": 22}),  # a shared key with the same value
        ({"log_hparams": False}, {}, {"batch_size": 4, "n": 22, "log_hparams": True}),
        ({}, {"log_hparams": False}, {"lr": 0.05, "batch_size": 4, "log_hparams": True}),
        ({"log_hparams": False}, {"log_hparams": False}, None),
    ],
    ids=["merged", "datamodule-only", "module-only", "neither"],
)
def test_datamodule_hparams_reach_the_loggers_merged_with_the_modules(tmp_path, module_args, data_args, expected):
    outcome = _logged_hparams(tmp_path, module_args, data_args)
    assert outcome["raylight"] == outcome["lightning"] == ([expected] if expected is not None else [])


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_validate_test_and_predict_log_the_hparams_as_fit_does(tmp_path, stage):
    # Lightning gives its loggers the merged hparams as any stage starts, not only fit.
    merged = {"lr": 0.05, "batch_size": 4, "log_hparams": True, "n": 22}
    assert _logged_hparams(tmp_path, {}, {}, stage=stage) == {"lightning": [merged], "raylight": [merged]}
    module_only = {"lr": 0.05, "batch_size": 4, "log_hparams": True}
    outcome = _logged_hparams(tmp_path, {}, {"log_hparams": False}, stage=stage)
    assert outcome == {"lightning": [module_only], "raylight": [module_only]}
    # A clash is the same error as at fit.
    outcome = _logged_hparams(tmp_path, {"batch_size": 8}, {}, stage=stage)
    assert isinstance(outcome["lightning"], RuntimeError) and isinstance(outcome["raylight"], RuntimeError)
    assert "'batch_size': 8 in the module, 4 in the datamodule" in str(outcome["raylight"])


def test_a_resumed_fit_does_not_log_the_hparams_again(tmp_path):
    # A deliberate difference from Lightning: the resumed run continues the run directory whose logs hold them.
    first, resumed = recording_logger(RL), recording_logger(RL)
    for epochs, logger, ckpt_path in ((1, first, None), (2, resumed, "last")):
        trainer = RL.trainer(str(tmp_path), max_epochs=epochs, run_name="r", logger=[logger], enable_checkpointing=True)
        trainer.fit(module_class(HparamsModule, RL)(), datamodule=_hparams_data(RL), ckpt_path=ckpt_path)
    assert first.hparams == [{"lr": 0.05, "batch_size": 4, "log_hparams": True, "n": 22}]
    assert trainer.current_epoch == 2 and resumed.rows and resumed.hparams == []


def test_clashing_module_and_datamodule_hparams_fail_fit_as_in_lightning(tmp_path):
    outcome = _logged_hparams(tmp_path, {"batch_size": 8, "log_hparams": False}, {"log_hparams": True})
    assert outcome["raylight"] == outcome["lightning"] == [{"batch_size": 4, "n": 22, "log_hparams": True}]
    outcome = _logged_hparams(tmp_path, {"batch_size": 8}, {})
    assert isinstance(outcome["lightning"], RuntimeError) and "['batch_size']" in str(outcome["lightning"])
    assert isinstance(outcome["raylight"], RuntimeError), outcome["raylight"]
    assert "'batch_size': 8 in the module, 4 in the datamodule" in str(outcome["raylight"])
    # Without a logger there is nothing to merge for, so no error (Lightning checks only for its loggers).
    assert _logged_hparams(tmp_path, {"batch_size": 8}, {}, with_logger=False) == {"lightning": [], "raylight": []}


def test_from_datasets_serves_each_stage_as_lightning_does(tmp_path):
    import pickle

    from torch.utils.data import RandomSampler, SequentialSampler

    train, val = loader(n=22).dataset, loader(n=10, seed=99).dataset

    def describe(dm):
        shape = {}
        for hook in ("train_dataloader", "val_dataloader", "test_dataloader"):
            got = getattr(dm, hook)()
            loaders = got if isinstance(got, list) else list(got.values()) if isinstance(got, dict) else [got]
            shape[hook] = (type(got).__name__, [(len(dl), dl.batch_size, type(dl.sampler).__name__) for dl in loaders])
        return shape

    made = {}
    for side in (PL, RL):
        made[side] = side.DataModule.from_datasets(
            train_dataset=train, val_dataset=[val, val], test_dataset={"a": val}, batch_size=4
        )
    assert describe(made[RL]) == describe(made[PL])
    assert isinstance(made[RL].train_dataloader().sampler, RandomSampler)
    assert isinstance(made[RL].val_dataloader()[0].sampler, SequentialSampler)
    assert describe(pickle.loads(pickle.dumps(made[RL]))) == describe(made[RL])  # travels in a Ray job

    # A fit on it trains as Lightning's does (shuffled the same way from the same seed).
    plm, rlm = build_pair(Regressor)
    runs = []
    for side, model in ((PL, plm), (RL, rlm)):
        dm = side.DataModule.from_datasets(train_dataset=train, val_dataset=val, batch_size=4)
        trainer = side.trainer(str(tmp_path / side.name), max_epochs=2)
        torch.manual_seed(1)
        trainer.fit(model, datamodule=dm)
        runs.append(Run(side, trainer, model))
    assert_fit_parity(*runs)
