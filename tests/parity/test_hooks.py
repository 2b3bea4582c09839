"""The order of hook calls (module and Callback) during fit/validate/test/predict is Lightning's.

Every module hook and every Callback hook appends its name to one shared
list and then runs the base class's implementation, so the default
behaviour (eval mode, batch transfer, optimizer step, ...) is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from tests.parity.bodies import Regressor
from tests.parity.harness import PL, RL, assert_same_sequence, build_pair, callback_class, loader

# Hooks only Lightning has, by design: raylight builds the model in __init__ (no deferred or sharded
# construction), so it never calls them. They are not recorded (overriding both makes Lightning raise), and
# any call to them is dropped from a recorded sequence before comparing.
LIGHTNING_ONLY_HOOKS = frozenset({"configure_model", "configure_sharded_model"})

MODULE_HOOKS = (
    # lifecycle and data
    "prepare_data", "setup", "teardown", "configure_callbacks", "configure_optimizers",
    "train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader",
    "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
    # fit
    "on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end",
    "on_train_batch_start", "on_train_batch_end", "training_step",
    "on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step", "configure_gradient_clipping",
    "optimizer_step", "on_before_zero_grad", "optimizer_zero_grad", "lr_scheduler_step",
    # evaluation
    "on_validation_model_zero_grad", "on_validation_model_eval", "on_validation_model_train",
    "on_validation_start", "on_validation_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_validation_batch_start", "on_validation_batch_end", "validation_step",
    "on_test_model_eval", "on_test_model_train", "on_test_start", "on_test_end", "on_test_epoch_start",
    "on_test_epoch_end", "on_test_batch_start", "on_test_batch_end", "test_step",
    "on_predict_model_eval", "on_predict_start", "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end",
    "on_predict_batch_start", "on_predict_batch_end", "predict_step",
    # checkpoints
    "on_save_checkpoint", "on_load_checkpoint",
)

CALLBACK_HOOKS = (
    "setup", "teardown", "on_fit_start", "on_fit_end", "on_sanity_check_start", "on_sanity_check_end",
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end",
    "on_train_batch_start", "on_train_batch_end",
    "on_validation_start", "on_validation_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_validation_batch_start", "on_validation_batch_end",
    "on_test_start", "on_test_end", "on_test_epoch_start", "on_test_epoch_end",
    "on_test_batch_start", "on_test_batch_end",
    "on_predict_start", "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end",
    "on_predict_batch_start", "on_predict_batch_end",
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "on_exception", "on_save_checkpoint", "on_load_checkpoint",
)  # state_dict/load_state_dict are left out: they are called to build checkpoints, not as loop events.

# Shared by the module and the callback of one run; cleared before each run.
CALLS: list[str] = []


class DataRegressor(Regressor):
    """Regressor with its own dataloaders and a scheduler, so that every hook is reachable."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1)}

    def train_dataloader(self):
        return loader(n=10)  # 3 batches

    def val_dataloader(self):
        return loader(n=6, seed=99)  # 2 batches

    def test_dataloader(self):
        return loader(n=6, seed=98)

    def predict_dataloader(self):
        return loader(n=6, seed=97)


class ManualDataRegressor(DataRegressor):
    """Manual optimization: zero_grad, manual_backward, step, and the scheduler stepped on the last batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        if batch_idx == self.trainer.num_training_batches - 1:
            self.lr_schedulers().step()


class HookedModule(DataRegressor):
    pass


class HookedManualModule(ManualDataRegressor):
    pass


class HookedCallback:
    pass


def _recording(cls: type, name: str, owner: str):
    def hook(self, *args, **kwargs):
        CALLS.append(f"{owner}.{name}")
        # The next implementation in the MRO: DataRegressor's, else the side's base class's.
        return getattr(super(cls, self), name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    return hook


for _name in MODULE_HOOKS:
    setattr(HookedModule, _name, _recording(HookedModule, _name, "module"))
    setattr(HookedManualModule, _name, _recording(HookedManualModule, _name, "module"))
for _name in CALLBACK_HOOKS:
    setattr(HookedCallback, _name, _recording(HookedCallback, _name, "callback"))


def _record(side, model, stage: str, tmp_path, trainer_args):
    callbacks = [callback_class(HookedCallback, side)()]
    trainer = side.trainer(str(tmp_path / side.name), callbacks=callbacks, **trainer_args)
    CALLS.clear()
    torch.manual_seed(1)
    getattr(trainer, stage)(model)
    return [c for c in CALLS if c.split(".", 1)[1] not in LIGHTNING_ONLY_HOOKS]


def _pair(body=HookedModule):
    return build_pair(body)


FIT_ARGS = {
    "plain": dict(max_epochs=1, num_sanity_val_steps=1),
    "accumulate-2-clip": dict(max_epochs=1, num_sanity_val_steps=0, accumulate_grad_batches=2, gradient_clip_val=1.0),
    "val-every-2-batches": dict(max_epochs=1, num_sanity_val_steps=0, val_check_interval=2),
}


@pytest.mark.parametrize("variant", list(FIT_ARGS))
def test_hook_order_fit(tmp_path, variant):
    plm, rlm = _pair()
    expected = _record(PL, plm, "fit", tmp_path, FIT_ARGS[variant])
    actual = _record(RL, rlm, "fit", tmp_path, FIT_ARGS[variant])
    assert_same_sequence(expected, actual)


def test_hook_order_fit_manual_optimization(tmp_path):
    plm, rlm = _pair(HookedManualModule)
    expected = _record(PL, plm, "fit", tmp_path, FIT_ARGS["plain"])
    actual = _record(RL, rlm, "fit", tmp_path, FIT_ARGS["plain"])
    assert_same_sequence(expected, actual)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_hook_order_evaluate_and_predict(tmp_path, stage):
    plm, rlm = _pair()
    expected = _record(PL, plm, stage, tmp_path, {})
    actual = _record(RL, rlm, stage, tmp_path, {})
    assert_same_sequence(expected, actual)


def test_hook_order_test_after_fit(tmp_path):
    # A fitted module tested with a new Trainer: only the test call's sequence is compared.
    plm, rlm = _pair()
    _record(PL, plm, "fit", tmp_path / "fit", FIT_ARGS["plain"])
    _record(RL, rlm, "fit", tmp_path / "fit", FIT_ARGS["plain"])
    expected = _record(PL, plm, "test", tmp_path / "test", {})
    actual = _record(RL, rlm, "test", tmp_path / "test", {})
    assert_same_sequence(expected, actual)


class _StatefulCallback:
    """Two of these, with state, record what restoring a checkpoint calls and in which order."""

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key

    @property
    def state_key(self):
        return f"Stateful[{self.key}]"

    def state_dict(self):
        return {"key": self.key}

    def load_state_dict(self, state):
        CALLS.append(f"callback{self.key}.load_state_dict")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        CALLS.append(f"callback{self.key}.on_load_checkpoint")


class _StatefulData:
    def train_dataloader(self):
        return loader(n=10)

    def state_dict(self):
        return {"seen": 1}

    def load_state_dict(self, state):
        CALLS.append("datamodule.load_state_dict")


def test_restoring_a_checkpoint_calls_the_datamodule_then_callbacks_on_load_then_their_state(tmp_path):
    sequences = {}
    for side, model in zip((PL, RL), build_pair(Regressor)):
        data = type(f"StatefulData_{side.name}", (_StatefulData, side.DataModule), {})()
        callbacks = lambda: [callback_class(_StatefulCallback, side)(k) for k in (1, 2)]  # noqa: E731
        first = side.trainer(str(tmp_path / side.name), max_epochs=1, callbacks=callbacks())
        first.fit(model, datamodule=data)
        path = str(tmp_path / side.name / "resume.ckpt")
        first.save_checkpoint(path)
        CALLS.clear()
        side.trainer(str(tmp_path / side.name), max_epochs=2, callbacks=callbacks()).fit(
            model, datamodule=data, ckpt_path=path
        )
        sequences[side.name] = list(CALLS)
    assert sequences["lightning"] == [
        "datamodule.load_state_dict", "callback1.on_load_checkpoint", "callback2.on_load_checkpoint",
        "callback1.load_state_dict", "callback2.load_state_dict",
    ]
    assert sequences["raylight"] == sequences["lightning"]
