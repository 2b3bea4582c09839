"""LightningDataModule: when its hooks run relative to the module's, its hparams, and the trained result."""

from __future__ import annotations

import pytest

from tests.parity.bodies import Regressor
from tests.parity.harness import PL, RL, Run, assert_fit_parity, assert_same_sequence, build_pair, loader

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
