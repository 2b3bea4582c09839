"""Automatic optimization: gradient accumulation and gradient clipping match Lightning step for step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import runtime
from runtime.errors import MisconfigurationError
from tests.parity.bodies import DropoutRegressor, Regressor
from tests.parity.harness import PL, RL, assert_fit_parity, loader, module_class, run_both


def test_accumulate_grad_batches_with_epoch_not_divisible(tmp_path):
    # 26 samples / batch 4 = 7 batches (last one holds 2): windows of 3, 3 and a final window of 1.
    pl_run, rl_run = run_both(
        Regressor,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=26)},
        trainer_args=dict(max_epochs=2, accumulate_grad_batches=3),
    )
    assert pl_run.trainer.global_step == 6  # sanity of the oracle: 3 optimizer steps per epoch
    assert_fit_parity(pl_run, rl_run)


# The second body overrides configure_gradient_clipping with the usual self.clip_gradients(optimizer): the
# Trainer's value and algorithm apply there too.
@pytest.mark.parametrize("body", ["Regressor", "ClipsWithTheTrainersSettings"])
@pytest.mark.parametrize("algorithm, value", [("norm", 0.05), ("value", 0.01)])
def test_gradient_clipping(tmp_path, algorithm, value, body):
    pl_run, rl_run = run_both(
        globals()[body],
        tmp_path=tmp_path,
        init_args={"lr": 0.5},
        trainer_args=dict(max_epochs=2, gradient_clip_val=value, gradient_clip_algorithm=algorithm),
    )
    assert_fit_parity(pl_run, rl_run)


def test_gradient_clipping_with_accumulation(tmp_path):
    pl_run, rl_run = run_both(
        Regressor,
        tmp_path=tmp_path,
        init_args={"lr": 0.5},
        data=lambda: {"train_dataloaders": loader(n=26)},
        trainer_args=dict(max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.05),
    )
    assert_fit_parity(pl_run, rl_run)


def _seed_everything(side, seed):
    # Each side's own seed_everything (Lightning's, or raylight's public one).
    if side is PL:
        pl.seed_everything(seed)
    else:
        runtime.seed_everything(seed)


@pytest.mark.parametrize("sanity_steps", [0, 1], ids=["no-sanity-check", "sanity-check"])
@pytest.mark.parametrize("seeding", ["torch.manual_seed", "seed_everything"])
def test_shuffle_and_dropout_follow_the_same_rng_stream(tmp_path, seeding, sanity_steps):
    # shuffle=True draws each epoch's permutation from the global RNG; dropout draws masks from it too.
    # The sanity check must not move the training RNG stream (iterating a DataLoader draws a base seed).
    pl_run, rl_run = run_both(
        DropoutRegressor,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22, shuffle=True), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=3, num_sanity_val_steps=sanity_steps),
        seed_fn=_seed_everything if seeding == "seed_everything" else None,
    )
    assert_fit_parity(pl_run, rl_run)


class SkipsSomeBatches(Regressor):
    """training_step returns None on every third batch (skip), and a dict with extra outputs otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_end_outputs: list = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx % 3 == 1:
            return None
        return {"loss": loss, "extra": batch_idx * 10}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.batch_end_outputs.append(
            None if outputs is None else {k: (round(float(v), 6) if k == "loss" else v) for k, v in outputs.items()}
        )


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_step_returning_none_skips_the_batch(tmp_path, accumulate):
    pl_run, rl_run = run_both(
        SkipsSomeBatches, tmp_path=tmp_path, trainer_args=dict(max_epochs=2, accumulate_grad_batches=accumulate)
    )
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.model.batch_end_outputs == pl_run.model.batch_end_outputs


class StopsEpochEarly(Regressor):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 3 else None


def test_on_train_batch_start_minus_one_ends_the_epoch(tmp_path):
    pl_run, rl_run = run_both(
        StopsEpochEarly,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=2),
    )
    assert pl_run.trainer.global_step == 6
    assert_fit_parity(pl_run, rl_run)


class WarmupInOptimizerStep(Regressor):
    """The Lightning docs' LR warm-up: override optimizer_step, change the LR, then step with the closure."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        scale = min(1.0, float(self.trainer.global_step + 1) / 5.0)
        for group in optimizer.param_groups:
            group["lr"] = scale * self.lr
        optimizer.step(closure=optimizer_closure)


class CustomClipping(Regressor):
    """configure_gradient_clipping override: clip only after the first epoch, by value, at a fixed threshold."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.current_epoch > 0:
            self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="value")


@pytest.mark.parametrize("body", [WarmupInOptimizerStep, CustomClipping], ids=lambda b: b.__name__)
def test_overridden_optimization_hooks(tmp_path, body):
    pl_run, rl_run = run_both(
        body, tmp_path=tmp_path, init_args={"lr": 0.5}, trainer_args=dict(max_epochs=2, accumulate_grad_batches=2)
    )
    assert_fit_parity(pl_run, rl_run)


class ClipsWithTheTrainersSettings(Regressor):
    """The common override: a condition, then self.clip_gradients(optimizer) with the Trainer's value and algorithm."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.global_step % 2 == 0:
            self.clip_gradients(optimizer)


def test_clip_gradients_with_a_value_other_than_the_trainers_is_refused_naming_both(tmp_path):
    class Conflicting(Regressor):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=0.5)

    model = module_class(Conflicting, RL)()
    trainer = RL.trainer(str(tmp_path), max_epochs=1, gradient_clip_val=0.05)
    with pytest.raises(MisconfigurationError, match=r"gradient_clip_val=0\.5.*Trainer\(gradient_clip_val=0\.05\)"):
        trainer.fit(model, loader())


# "16-mixed" is not compared: on CPU Lightning silently runs bf16 while raylight runs fp16 with a GradScaler.
@pytest.mark.parametrize("precision", ["bf16-mixed", "64-true", "bf16-true"])
def test_precision(tmp_path, precision):
    pl_run, rl_run = run_both(
        Regressor,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=2, precision=precision),
    )
    assert_fit_parity(pl_run, rl_run)
    assert next(rl_run.model.parameters()).dtype == next(pl_run.model.parameters()).dtype


class LBFGSRegressor(Regressor):
    """LBFGS evaluates the closure (training_step and backward) several times per step."""

    def __init__(self) -> None:
        super().__init__()
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_an_optimizer_that_calls_the_closure_itself_trains_as_in_lightning(tmp_path):
    pl_run, rl_run = run_both(LBFGSRegressor, tmp_path=tmp_path, trainer_args={"max_epochs": 2,
                                                                                "gradient_clip_val": 0.5})
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.model.training_steps == pl_run.model.training_steps > 2 * rl_run.trainer.global_step


def test_16_mixed_refuses_an_optimizer_that_calls_the_closure_itself(tmp_path):
    from launcher import Trainer

    model = module_class(LBFGSRegressor, RL)()
    trainer = Trainer(max_epochs=1, num_workers=0, precision="16-mixed", default_root_dir=str(tmp_path), logger=False)
    with pytest.raises(ValueError, match=r"precision='16-mixed' cannot step LBFGS.*'bf16-mixed' or '32-true'"):
        trainer.fit(model, loader())


class ClipsWithACapitalisedAlgorithm(Regressor):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="Value")


def test_clip_gradients_takes_the_algorithm_in_any_case(tmp_path):
    pl_run, rl_run = run_both(ClipsWithACapitalisedAlgorithm, tmp_path=tmp_path, init_args={"lr": 0.5},
                              trainer_args=dict(max_epochs=2))
    assert_fit_parity(pl_run, rl_run)


class StepsEveryOtherBatch(Regressor):
    """A documented optimizer_step override: the closure runs on every batch, the optimizer steps on every other."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if batch_idx % 2 == 0:
            optimizer.step(closure=optimizer_closure)
        else:
            optimizer_closure()


@pytest.mark.parametrize(
    "trainer_args",
    [dict(max_epochs=2), dict(max_epochs=10, max_steps=6), dict(max_epochs=2, accumulate_grad_batches=2)],
    ids=["epochs", "max_steps", "accumulation"],
)
def test_global_step_counts_optimizer_step_calls_as_in_lightning(tmp_path, trainer_args):
    pl_run, rl_run = run_both(StepsEveryOtherBatch, tmp_path=tmp_path, data=lambda: {"train_dataloaders": loader(n=26)},
                              trainer_args=trainer_args)
    assert_fit_parity(pl_run, rl_run)
