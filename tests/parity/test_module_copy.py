"""Copying and pickling a LightningModule, during fit and after it, as in Lightning.

An EMA callback deep-copies the module while it trains; a user pickles a
fitted model or fits it a second time (raylight then pickles it into the
run directory). The copy must be a plain module: the same weights and
outputs, attached to no trainer.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import cloudpickle
import pytest
import torch

from runtime import LightningDataModule as RL_DataModule
from tests.parity.bodies import Regressor
from tests.parity.harness import (
    PL,
    RL,
    SIDES,
    assert_fit_parity,
    assert_same_weights,
    build_pair,
    callback_class,
    loader,
    run_both,
)

DECAY = 0.5
PROBE = torch.linspace(-1, 1, 12).reshape(3, 4)


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EMAWeights:
    """Keeps an exponential moving average of the weights in a deep copy, and a snapshot at each epoch end."""

    def __init__(self) -> None:
        self.ema = None
        self.after_batch: list[dict[str, torch.Tensor]] = []
        self.snapshots: list = []
        self.snapshot_weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_batch.append(_weights(pl_module))
        if self.ema is None:
            self.ema = copy.deepcopy(pl_module)
            return
        with torch.no_grad():
            for averaged, current in zip(self.ema.parameters(), pl_module.parameters()):
                averaged.mul_(DECAY).add_(current, alpha=1 - DECAY)

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots.append(copy.deepcopy(pl_module))
        self.snapshot_weights.append(_weights(pl_module))


def _expected_ema(after_batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    expected = dict(after_batch[0])
    for weights in after_batch[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k] for k in expected}
    return expected


def test_deepcopy_in_a_callback_during_fit_keeps_an_ema_of_the_weights(tmp_path):
    pl_run, rl_run = run_both(
        Regressor,
        tmp_path=tmp_path,
        trainer_args={"max_epochs": 2},
        callbacks=lambda side: [callback_class(EMAWeights, side)()],
    )
    assert_fit_parity(pl_run, rl_run)
    pl_ema, rl_ema = pl_run.callbacks[0], rl_run.callbacks[0]
    assert len(rl_ema.after_batch) == 12 and len(rl_ema.snapshots) == 2

    expected = _expected_ema(rl_ema.after_batch)
    for key, value in rl_ema.ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=f"EMA weight {key}")
    assert_same_weights(pl_ema.ema, rl_ema.ema)

    for epoch, (snapshot, weights) in enumerate(zip(rl_ema.snapshots, rl_ema.snapshot_weights)):
        # A snapshot keeps the weights of its epoch end while the module trains on.
        for key, value in snapshot.state_dict().items():
            assert torch.equal(value, weights[key]), f"epoch {epoch} snapshot: {key}"
        assert_same_weights(pl_ema.snapshots[epoch], snapshot)
        with torch.no_grad():
            torch.testing.assert_close(snapshot(PROBE), pl_ema.snapshots[epoch](PROBE), rtol=0, atol=1e-6)
    assert not torch.equal(rl_ema.snapshots[0].net[0].weight, rl_run.model.net[0].weight)

    # As in Lightning, a copy is attached to no trainer: logging from it is a no-op, self.trainer raises.
    for run in (pl_run, rl_run):
        copied = run.callbacks[0].ema
        with pytest.raises(RuntimeError, match="not attached to a `?Trainer"):
            copied.trainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning warns that the module has no trainer
            copied.log("ignored", 1.0)


class SavedHParams(Regressor):
    def __init__(self, lr: float = 0.05, hidden: int = 8, tag: str = "ema") -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters()


# Top-level classes (not the harness's per-side ones, made with type()) so that plain pickle finds them.
class SavedHParamsLightning(SavedHParams, PL.Module):
    pass


class SavedHParamsRaylight(SavedHParams, RL.Module):
    pass


SAVED_HPARAMS = {PL: SavedHParamsLightning, RL: SavedHParamsRaylight}

ROUND_TRIPS = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "cloudpickle": lambda m: cloudpickle.loads(cloudpickle.dumps(m)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("side", SIDES, ids=str)
@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_a_fitted_model_survives_a_round_trip(tmp_path, side, how):
    model = SAVED_HPARAMS[side](hidden=6, tag="fitted")
    side.trainer(str(tmp_path), max_epochs=1).fit(model, train_dataloaders=loader())

    restored = ROUND_TRIPS[how](model)

    assert restored.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(restored(PROBE), model(PROBE))
    assert dict(restored.hparams) == {"lr": 0.05, "hidden": 6, "tag": "fitted"}
    assert dict(restored.hparams_initial) == dict(model.hparams_initial)
    with pytest.raises(RuntimeError, match="not attached to a `?Trainer"):
        restored.trainer


def test_fitting_the_same_model_twice_saves_the_job_both_times(tmp_path, monkeypatch):
    from launcher.job_file import read_job

    monkeypatch.setenv("RAYLIGHT_KEY_FILE", str(tmp_path / "key" / "job.key"))
    _, model = build_pair(Regressor)
    RL.trainer(str(tmp_path / "first"), max_epochs=1).fit(model, train_dataloaders=loader())
    after_first = _weights(model)

    second = RL.trainer(str(tmp_path / "second"), max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.fit(model, train_dataloaders=loader())

    assert not [str(w.message) for w in caught if "could not be saved" in str(w.message)]
    # The saved job is what `raylight resume` would restart from: the model as the second fit began.
    saved = cloudpickle.loads(read_job(second.run_dir.path)["job"]).module
    for key, value in after_first.items():
        assert torch.equal(saved.state_dict()[key], value), key
    assert not torch.equal(model.net[0].weight, after_first["net.0.weight"])


class Loaders(RL_DataModule):
    def __init__(self, batch_size: int = 4):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return loader(batch_size=self.hparams.batch_size)


def test_a_datamodule_used_by_a_fit_pickles_and_serves_the_next_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIGHT_KEY_FILE", str(tmp_path / "key" / "job.key"))
    _, model = build_pair(Regressor)
    data = Loaders()
    RL.trainer(str(tmp_path / "first"), max_epochs=1).fit(model, datamodule=data)
    copied = pickle.loads(pickle.dumps(data))
    assert copied.trainer is None and dict(copied.hparams) == {"batch_size": 4}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = RL.trainer(str(tmp_path / "second"), max_epochs=1)
        second.fit(model, datamodule=data)
    assert not [str(w.message) for w in caught if "could not be saved" in str(w.message)]
    assert second.global_step == len(loader())
