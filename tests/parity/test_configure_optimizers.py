"""Every return format of configure_optimizers: same weights, learning rates and scheduler state as Lightning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.parity.bodies import Regressor
from tests.parity.harness import RL, assert_fit_parity, loader, lrs, module_class, run_both


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def _single(m):
    return _sgd(m)


def _list(m):
    return [_sgd(m)]


def _lists(m):
    opt = _sgd(m)
    return [opt], [_step_lr(opt)]


def _dict(m):
    opt = _sgd(m)
    return {"optimizer": opt, "lr_scheduler": _step_lr(opt)}


def _dict_step_interval_frequency_2(m):
    opt = _sgd(m)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}


def _plateau_monitor_val(m):
    opt = _sgd(m)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
    # mode="max" on a loss: every epoch is "not an improvement" after the first, so the LR halves each epoch.
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


def _plateau_monitor_top_level(m):
    opt = _sgd(m)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
    return {"optimizer": opt, "lr_scheduler": sched, "monitor": "val_loss"}


def _plateau_step_interval_train_metric(m):
    opt = _sgd(m)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.9, patience=0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss", "interval": "step"}}


def _epoch_interval_frequency_2(m):
    opt = _sgd(m)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": _step_lr(opt), "interval": "epoch", "frequency": 2}}


def _list_of_one_dict(m):
    opt = _sgd(m)
    return [{"optimizer": opt, "lr_scheduler": {"scheduler": _step_lr(opt), "interval": "step"}}]


def _multistep(m):
    opt = _sgd(m)
    return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.5)]


def _sequential(m):
    opt = _sgd(m)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=1)
    steps = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.5)
    return [opt], [torch.optim.lr_scheduler.SequentialLR(opt, [warmup, steps], milestones=[1])]


FORMATS = {
    "optimizer": _single,
    "[optimizer]": _list,
    "([optimizer], [scheduler])": _lists,
    "{optimizer, lr_scheduler}": _dict,
    "{optimizer, lr_scheduler: {interval=step, frequency=2}}": _dict_step_interval_frequency_2,
    "ReduceLROnPlateau monitor=val_loss in scheduler dict": _plateau_monitor_val,
    "ReduceLROnPlateau monitor=val_loss next to lr_scheduler": _plateau_monitor_top_level,
    "ReduceLROnPlateau interval=step monitor=train_loss": _plateau_step_interval_train_metric,
    "{optimizer, lr_scheduler: {interval=epoch, frequency=2}}": _epoch_interval_frequency_2,
    "[{optimizer, lr_scheduler}]": _list_of_one_dict,
    "MultiStepLR": _multistep,
    "SequentialLR of LinearLR and MultiStepLR": _sequential,
}


class ConfiguredRegressor(Regressor):
    def __init__(self, fmt: str = "optimizer") -> None:
        super().__init__()
        self.fmt = fmt

    def configure_optimizers(self):
        return FORMATS[self.fmt](self)


def _optimizers(run):
    # The module's trainer (Lightning's Trainer / raylight's engine) holds the optimizers it built.
    return run.model.trainer.optimizers


def _scheduler_states(run):
    trainer = run.model.trainer
    states = []
    for config in trainer.lr_scheduler_configs:
        state = config.scheduler.state_dict()
        states.append({k: state[k] for k in ("last_epoch", "_last_lr", "num_bad_epochs", "best") if k in state})
    return states


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_configure_optimizers_format(tmp_path, fmt):
    pl_run, rl_run = run_both(
        ConfiguredRegressor,
        tmp_path=tmp_path,
        init_args={"fmt": fmt},
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=3, num_sanity_val_steps=0),
    )
    assert_fit_parity(pl_run, rl_run)
    assert lrs(_optimizers(rl_run)) == pytest.approx(lrs(_optimizers(pl_run)), abs=1e-12)
    assert _scheduler_states(rl_run) == _scheduler_states(pl_run)
    assert [(c.interval, c.frequency) for c in rl_run.model.trainer.lr_scheduler_configs] == [
        (c.interval, c.frequency) for c in pl_run.model.trainer.lr_scheduler_configs
    ]


class TwoOptimizerDicts(Regressor):
    """A list of two dicts (one optimizer per layer, each with its scheduler) needs manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        sched_a, sched_b = self.lr_schedulers()
        for opt in (opt_a, opt_b):
            loss = F.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        if batch_idx == self.trainer.num_training_batches - 1:
            sched_a.step()
            sched_b.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        opt_a = torch.optim.SGD(self.net[0].parameters(), lr=0.1)
        opt_b = torch.optim.Adam(self.net[2].parameters(), lr=0.01)
        return [
            {"optimizer": opt_a, "lr_scheduler": _step_lr(opt_a)},
            {"optimizer": opt_b, "lr_scheduler": {"scheduler": _step_lr(opt_b), "interval": "step"}},
        ]


def test_configure_optimizers_list_of_two_dicts_manual(tmp_path):
    pl_run, rl_run = run_both(TwoOptimizerDicts, tmp_path=tmp_path, trainer_args=dict(max_epochs=2))
    assert_fit_parity(pl_run, rl_run)
    assert lrs(_optimizers(rl_run)) == pytest.approx(lrs(_optimizers(pl_run)), abs=1e-12)
    assert _scheduler_states(rl_run) == _scheduler_states(pl_run)


class ReturnsNone(Regressor):
    def configure_optimizers(self):
        return None


def test_configure_optimizers_returning_none_trains_without_updating_weights(tmp_path):
    with pytest.warns(UserWarning, match="returned None"):
        pl_run, rl_run = run_both(ReturnsNone, tmp_path=tmp_path, trainer_args=dict(max_epochs=2))
    assert rl_run.trainer.global_step == pl_run.trainer.global_step == 12
    assert_fit_parity(pl_run, rl_run)


class SchedulerKeyAtTheTop(Regressor):
    def configure_optimizers(self):
        opt = _sgd(self)
        return {"optimizer": opt, "lr_scheduler": _step_lr(opt), "interval": "step"}


def test_an_unknown_key_next_to_the_optimizer_is_ignored_with_a_warning(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"\['interval'\] .*ignored.*inside the 'lr_scheduler' dict"):
        pl_run, rl_run = run_both(SchedulerKeyAtTheTop, tmp_path=tmp_path, trainer_args=dict(max_epochs=3))
    assert_fit_parity(pl_run, rl_run)
    assert lrs(_optimizers(rl_run)) == pytest.approx(lrs(_optimizers(pl_run)), abs=1e-12)


@pytest.mark.parametrize("fmt", ["MultiStepLR", "SequentialLR of LinearLR and MultiStepLR"])
def test_a_scheduler_whose_state_holds_a_counter_is_checkpointed_and_resumes(tmp_path, fmt):
    """MultiStepLR keeps its milestones in a collections.Counter, which torch.load(weights_only=True) reads."""
    from launcher import Trainer

    def fit(epochs, ckpt_path=None):
        torch.manual_seed(0)
        model = module_class(ConfiguredRegressor, RL)(fmt=fmt)
        trainer = Trainer(max_epochs=epochs, num_workers=0, default_root_dir=str(tmp_path), run_name=f"r{epochs}",
                          logger=False, enable_progress_bar=False, num_sanity_val_steps=0)
        trainer.fit(model, loader(n=22), ckpt_path=ckpt_path)
        return model, trainer

    full, _ = fit(3)
    _, first = fit(2)
    saved = torch.load(first.checkpoint_callback.last_model_path, weights_only=True)
    resumed, second = fit(3, ckpt_path=first.checkpoint_callback.last_model_path)
    assert saved["lr_schedulers"][0] == first.lr_scheduler_configs[0].scheduler.state_dict()
    assert lrs(second.optimizers) == lrs(full.trainer.optimizers)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), full.state_dict().values()))


class PlateauOnTrainLoss(ConfiguredRegressor):
    def __init__(self, stop_at: int = -1) -> None:
        super().__init__()
        self.stop_at = stop_at

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == self.stop_at else None

    def configure_optimizers(self):
        opt = _sgd(self)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}


@pytest.mark.parametrize("stop", [{"max_steps": 10}, {"stop_at": 3}], ids=["max_steps-mid-epoch", "batch-start--1"])
def test_a_plateau_scheduler_steps_when_the_epoch_reached_its_end_not_when_max_steps_cut_it(tmp_path, stop):
    """max_steps mid-epoch: no plateau step; on_train_batch_start returning -1 ends the epoch as its last batch."""
    trainer_args = {"max_epochs": 4, "num_sanity_val_steps": 0}
    trainer_args.update({k: v for k, v in stop.items() if k == "max_steps"})
    pl_run, rl_run = run_both(
        PlateauOnTrainLoss, tmp_path=tmp_path, init_args={k: v for k, v in stop.items() if k == "stop_at"},
        data=lambda: {"train_dataloaders": loader(n=26)}, trainer_args=trainer_args,
    )
    assert_fit_parity(pl_run, rl_run)
    state = lambda run: {k: run.model.trainer.lr_scheduler_configs[0].scheduler.state_dict()[k]  # noqa: E731
                         for k in ("last_epoch", "num_bad_epochs", "best")}
    assert state(rl_run) == state(pl_run)
