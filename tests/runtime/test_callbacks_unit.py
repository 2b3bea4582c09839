"""Unit tests for the built-in callbacks, driven by a small stand-in for the engine.

The stand-in implements only the attributes the callbacks may rely on; its
``save_checkpoint`` writes a real file so the tests can check what is on disk.
"""

from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from runtime.callbacks import Callback, EarlyStopping, EarlyStoppingReason, LearningRateMonitor, ModelCheckpoint
from runtime.errors import MisconfigurationError
from runtime.state import TrainerFn, TrainerState


class FakeStrategy:
    def __init__(self, force_decision: bool | None = None):
        self.force_decision = force_decision
        self.decisions: list[tuple[bool, bool]] = []

    def broadcast(self, obj, src=0):
        return obj

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.decisions.append((decision, all))
        return decision if self.force_decision is None else self.force_decision


class FakeTrainer:
    def __init__(self, root, **overrides):
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.current_epoch = 0
        self.global_step = 0
        self.is_global_zero = True
        self.sanity_checking = False
        self.fast_dev_run = 0
        self.should_stop = False
        self.state = TrainerState(fn=TrainerFn.FITTING)
        self.max_epochs = 10
        self.check_val_every_n_epoch = 1
        self.val_check_interval = 1.0
        self.num_val_batches: list[int] = [2]
        self.loggers: list = []
        self.optimizers: list = []
        self.lr_scheduler_configs: list = []
        self.default_checkpoint_dir = str(root / "default_ckpts")
        self.strategy = FakeStrategy()
        self.fit_loop_batches_that_stepped = 0
        self.logged: list[tuple[int | None, dict[str, float]]] = []
        self.saves: list[tuple[str, bool]] = []
        for key, value in overrides.items():
            setattr(self, key, value)

    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        self.saves.append((filepath, weights_only))
        os.makedirs(os.path.dirname(filepath), exist_ok=True)
        torch.save({"global_step": self.global_step, "epoch": self.current_epoch}, filepath)

    def remove_checkpoint(self, filepath: str) -> None:
        if os.path.exists(filepath):
            os.remove(filepath)

    def checkpoint_files_in(self, directory: str) -> list[str]:
        return [os.path.join(directory, name) for name in os.listdir(directory)] if os.path.isdir(directory) else []

    def checkpoint_exists(self, filepath: str) -> bool:
        return os.path.exists(filepath)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def files_in(directory) -> set[str]:
    found = set()
    for root, _, names in os.walk(directory):
        for name in names:
            found.add(os.path.relpath(os.path.join(root, name), directory))
    return found


def run_epochs(trainer, callbacks, val_metrics_per_epoch, steps_per_epoch=5, train_metrics=None):
    """Drive hooks in Lightning's order: batches, end-of-epoch validation, then train-epoch end."""
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    for cb in callbacks:
        cb.setup(trainer, None, "fit")
    for cb in callbacks:
        cb.on_train_start(trainer, None)
    for metrics in val_metrics_per_epoch:
        for cb in callbacks:
            cb.on_train_epoch_start(trainer, None)
        for batch_idx in range(steps_per_epoch):
            for cb in callbacks:
                cb.on_train_batch_start(trainer, None, None, batch_idx)
            trainer.global_step += 1
            trainer.fit_loop_batches_that_stepped += 1
            trainer.callback_metrics.update(train_metrics or {})
            for cb in callbacks:
                cb.on_train_batch_end(trainer, None, None, None, batch_idx)
        if metrics is not None:
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            for cb in callbacks:
                cb.on_validation_end(trainer, None)
        for cb in callbacks:
            cb.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            break
        trainer.current_epoch += 1
    for cb in callbacks:
        cb.on_train_end(trainer, None)


# ---------------------------------------------------------------- ModelCheckpoint: names


def test_default_filename_is_epoch_and_step(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    path = ckpt.format_checkpoint_name({"epoch": torch.tensor(1), "step": torch.tensor(20)})
    assert path == os.path.join(str(tmp_path), "epoch=1-step=20.ckpt")


def test_a_relative_dirpath_means_the_directory_where_the_callback_was_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = ModelCheckpoint(dirpath="ckpts")
    monkeypatch.chdir("/")  # a Ray worker runs in a directory of its own
    expected = os.path.join(os.path.realpath(tmp_path), "ckpts", "epoch=0-step=1.ckpt")
    assert ckpt.format_checkpoint_name({"epoch": torch.tensor(0), "step": torch.tensor(1)}) == expected
    assert ModelCheckpoint(dirpath="~/ckpts").dirpath == os.path.realpath(os.path.expanduser("~/ckpts"))


def test_filename_format_specs_and_metric_names(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch:02d}-{val_loss:.2f}")
    path = ckpt.format_checkpoint_name({"epoch": torch.tensor(3), "val_loss": torch.tensor(0.123456)})
    assert os.path.basename(path) == "epoch=03-val_loss=0.12.ckpt"

    ckpt = ModelCheckpoint(filename="{epoch}-{step}-{val_loss:.2f}")
    name = ckpt.format_checkpoint_name({"epoch": 1, "step": 20, "val_loss": 0.1234})
    assert name == "epoch=1-step=20-val_loss=0.12.ckpt"


def test_filename_without_auto_inserted_names_and_slash_metrics(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="ep{epoch}-loss{val/loss:.3f}", auto_insert_metric_name=False)
    path = ckpt.format_checkpoint_name({"epoch": torch.tensor(2), "val/loss": torch.tensor(0.5)})
    assert os.path.basename(path) == "ep2-loss0.500.ckpt"

    # With the name inserted, "/" becomes a sub-folder, as in Lightning.
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{val/loss:.1f}")
    path = ckpt.format_checkpoint_name({"epoch": torch.tensor(2), "val/loss": torch.tensor(0.5)})
    assert path == os.path.join(str(tmp_path), "epoch=2-val", "loss=0.5.ckpt")


def test_filename_missing_metric_prefix_and_version(tmp_path):
    ckpt = ModelCheckpoint(filename="{missing:d}")
    assert ckpt.format_checkpoint_name({}) == "missing=0.ckpt"
    ckpt = ModelCheckpoint(filename="{epoch}")
    assert ckpt.format_checkpoint_name({"epoch": 4}, ver=2, prefix="run") == "run-epoch=4-v2.ckpt"
    assert ckpt.format_checkpoint_name({"epoch": 4}, filename=ModelCheckpoint.CHECKPOINT_NAME_LAST) == "last.ckpt"


def test_logged_epoch_float_is_formatted_as_int(tmp_path):
    trainer = FakeTrainer(tmp_path, global_step=7, current_epoch=1)
    trainer.callback_metrics = {"epoch": torch.tensor(1.0)}
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    names = ckpt.format_checkpoint_name(ckpt._monitor_candidates(trainer))
    assert os.path.basename(names) == "epoch=1-step=7.ckpt"


# ---------------------------------------------------------------- ModelCheckpoint: top-k


def test_top_k_min_mode_keeps_best_files(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch}-{val_loss:.2f}")
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.5, 0.3, 0.4, 0.1, 0.6)])

    assert files_in(tmp_path) == {"epoch=1-val_loss=0.30.ckpt", "epoch=3-val_loss=0.10.ckpt"}
    assert ckpt.best_model_path == str(tmp_path / "epoch=3-val_loss=0.10.ckpt")
    assert ckpt.best_model_score.item() == pytest.approx(0.1)
    assert ckpt.kth_best_model_path == str(tmp_path / "epoch=1-val_loss=0.30.ckpt")
    assert ckpt.kth_value.item() == pytest.approx(0.3)
    assert set(ckpt.best_k_models) == {str(tmp_path / n) for n in files_in(tmp_path)}
    # The best file holds the weights of the step it names.
    assert torch.load(ckpt.best_model_path, weights_only=True)["global_step"] == 20


def test_top_k_max_mode_keeps_best_files(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="acc", mode="max", save_top_k=2, filename="{epoch}")
    run_epochs(trainer, ckpt, [{"acc": v} for v in (0.5, 0.7, 0.6, 0.9, 0.2)])

    assert files_in(tmp_path) == {"epoch=1.ckpt", "epoch=3.ckpt"}
    assert ckpt.best_model_path == str(tmp_path / "epoch=3.ckpt")
    assert ckpt.best_model_score.item() == pytest.approx(0.9)
    assert ckpt.current_score.item() == pytest.approx(0.9)  # last score that made it into the top k


def test_top_k_decision_goes_through_strategy(tmp_path):
    trainer = FakeTrainer(tmp_path, strategy=FakeStrategy(force_decision=False))
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, filename="{epoch}")
    # Epoch 1 is better locally, but another rank disagrees: nobody saves it.
    run_epochs(trainer, ckpt, [{"val_loss": 0.5}, {"val_loss": 0.1}])
    assert files_in(tmp_path) == {"epoch=0.ckpt"}
    assert trainer.strategy.decisions == [(True, True)]


def test_save_top_k_all_and_none(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "all", monitor="val_loss", save_top_k=-1, filename="{epoch}")
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.5, 0.6, 0.7)])
    assert files_in(tmp_path / "all") == {"epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"}
    assert ckpt.best_model_path.endswith("epoch=0.ckpt")

    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "none", monitor="val_loss", save_top_k=0)
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.5, 0.6)])
    assert not (tmp_path / "none").exists()
    assert ckpt.best_model_path == ""


def test_nan_score_ranks_worst(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch}")
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (float("nan"), 0.4, 0.3)])
    assert files_in(tmp_path) == {"epoch=1.ckpt", "epoch=2.ckpt"}
    assert ckpt.best_model_score.item() == pytest.approx(0.3)


def test_no_monitor_keeps_only_latest_or_all(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "latest")
    run_epochs(trainer, ckpt, [None, None, None])
    assert files_in(tmp_path / "latest") == {"epoch=2-step=15.ckpt"}
    assert ckpt.best_model_path == str(tmp_path / "latest" / "epoch=2-step=15.ckpt")
    assert ckpt.best_model_score is None

    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "every", save_top_k=-1)
    run_epochs(trainer, ckpt, [None, None, None])
    assert files_in(tmp_path / "every") == {"epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "epoch=2-step=15.ckpt"}


def test_dirpath_defaults_to_trainer_dir(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint()
    run_epochs(trainer, ckpt, [None])
    assert ckpt.dirpath == trainer.default_checkpoint_dir
    assert files_in(trainer.default_checkpoint_dir) == {"epoch=0-step=5.ckpt"}


def test_save_last_and_weights_only(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, monitor="val_loss", save_last=True, save_weights_only=True, filename="{epoch}"
    )
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.5, 0.2, 0.9)])
    assert files_in(tmp_path) == {"epoch=1.ckpt", "last.ckpt"}
    assert ckpt.last_model_path == str(tmp_path / "last.ckpt")
    # As in Lightning 2.6, "last" is refreshed only when a checkpoint is saved (epoch 2 was not top-1).
    assert torch.load(ckpt.last_model_path, weights_only=True)["global_step"] == 10
    assert all(weights_only for _, weights_only in trainer.saves)


def test_save_last_with_templated_name_removes_previous(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=2)
    ckpt.CHECKPOINT_NAME_LAST = "{epoch}-last"
    run_epochs(trainer, ckpt, [None, None], steps_per_epoch=3)
    assert files_in(tmp_path) == {"epoch=1-last.ckpt"}


def test_save_last_at_train_end_when_nothing_saved(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True)
    run_epochs(trainer, ckpt, [None, None])
    assert files_in(tmp_path) == {"last.ckpt"}
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 10


# ---------------------------------------------------------------- ModelCheckpoint: triggers


def test_every_n_train_steps(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    run_epochs(trainer, ckpt, [None, None], steps_per_epoch=5)
    assert files_in(tmp_path) == {"step=3.ckpt", "step=6.ckpt", "step=9.ckpt"}
    assert ckpt.every_n_epochs == 0


def test_every_n_train_steps_waits_for_a_validation_only_metric(tmp_path):
    trainer = FakeTrainer(tmp_path, val_check_interval=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", every_n_train_steps=2, filename="{step}")
    ckpt.setup(trainer, None, "fit")
    trainer.global_step = 2
    ckpt.on_train_batch_end(trainer, None, None, None, 1)
    assert files_in(tmp_path) == set()
    trainer.callback_metrics["val_loss"] = torch.tensor(0.3)
    ckpt.on_validation_end(trainer, None)
    assert files_in(tmp_path) == {"step=2.ckpt"}


def test_every_n_epochs(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_top_k=-1, filename="{epoch}")
    run_epochs(trainer, ckpt, [None] * 5)
    assert files_in(tmp_path) == {"epoch=1.ckpt", "epoch=3.ckpt"}


def test_saves_after_validation_when_validation_is_not_once_per_epoch(tmp_path):
    for i, overrides in enumerate(({"val_check_interval": 0.5}, {"check_val_every_n_epoch": 2})):
        trainer = FakeTrainer(tmp_path, **overrides)
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(i), filename="{epoch}")
        assert not ckpt._should_save_on_train_epoch_end(trainer)
        ckpt.setup(trainer, None, "fit")
        trainer.global_step = 4
        ckpt.on_train_epoch_end(trainer, None)
        assert not (tmp_path / str(i)).exists()
        ckpt.on_validation_end(trainer, None)
        assert files_in(tmp_path / str(i)) == {"epoch=0.ckpt"}

    trainer = FakeTrainer(tmp_path, val_check_interval=0.5, num_val_batches=[])
    assert ModelCheckpoint()._should_save_on_train_epoch_end(trainer)  # no validation: epoch end
    assert ModelCheckpoint(save_on_train_epoch_end=True)._should_save_on_train_epoch_end(
        FakeTrainer(tmp_path, check_val_every_n_epoch=3)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"sanity_checking": True},
        {"fast_dev_run": 1},
        {"state": TrainerState(fn=TrainerFn.VALIDATING)},
        {"global_step": 0},
    ],
)
def test_skips_saving(tmp_path, overrides):
    trainer = FakeTrainer(tmp_path, **{"global_step": 3, **overrides})
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    ckpt.setup(trainer, None, "fit")
    ckpt.on_validation_end(trainer, None)
    ckpt.on_train_epoch_end(trainer, None)
    if "fast_dev_run" in overrides:
        ckpt.on_train_end(trainer, None)  # the only other hook of these that saves
    assert files_in(tmp_path) == set()


def test_does_not_save_twice_at_same_step(tmp_path):
    trainer = FakeTrainer(tmp_path, global_step=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    ckpt.setup(trainer, None, "fit")
    ckpt.on_train_epoch_end(trainer, None)
    ckpt.on_train_epoch_end(trainer, None)
    assert len(trainer.saves) == 1


def test_monitor_missing_lists_available_metrics(tmp_path):
    trainer = FakeTrainer(tmp_path, global_step=5)
    trainer.callback_metrics = {"val_acc": torch.tensor(0.9), "train_loss": torch.tensor(0.1)}
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    ckpt.setup(trainer, None, "fit")
    ckpt.on_validation_end(trainer, None)  # validation ran (and saving waits for train-epoch end)
    with pytest.raises(MisconfigurationError) as excinfo:
        ckpt.on_train_epoch_end(trainer, None)
    message = str(excinfo.value)
    assert "val_loss" in message and "val_acc" in message and "train_loss" in message
    assert "self.log('val_loss'" in message


def test_monitor_missing_before_any_validation_only_warns(tmp_path):
    trainer = FakeTrainer(tmp_path, global_step=5, num_val_batches=[])
    trainer.callback_metrics = {"train_loss": torch.tensor(0.1)}
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    ckpt.setup(trainer, None, "fit")
    with pytest.warns(UserWarning, match="train_loss"):
        ckpt.on_train_epoch_end(trainer, None)
    assert files_in(tmp_path) == set()


def test_version_counter(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "v", filename="model", monitor="val_loss", save_top_k=-1)
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.3, 0.2, 0.1)])
    assert files_in(tmp_path / "v") == {"model.ckpt", "model-v1.ckpt", "model-v2.ckpt"}

    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "nv", filename="model", monitor="val_loss", save_top_k=-1, enable_version_counter=False
    )
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.3, 0.2, 0.1)])
    assert files_in(tmp_path / "nv") == {"model.ckpt"}
    assert torch.load(tmp_path / "nv" / "model.ckpt", weights_only=True)["global_step"] == 15

    # Without a monitor the latest checkpoint reuses the name it replaces rather than versioning it.
    for top_k in (1, -1):
        trainer = FakeTrainer(tmp_path)
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"one{top_k}", filename="model", save_top_k=top_k)
        run_epochs(trainer, ckpt, [None, None])
        assert files_in(tmp_path / f"one{top_k}") == {"model.ckpt"}


def test_state_dict_round_trip_weights_only(tmp_path):
    trainer = FakeTrainer(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True, filename="{epoch}")
    run_epochs(trainer, ckpt, [{"val_loss": v} for v in (0.5, 0.3, 0.4)])
    torch.save({"callbacks": {ckpt.state_key: ckpt.state_dict()}}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["callbacks"]

    resumed = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True, filename="{epoch}")
    assert resumed.state_key in loaded
    resumed.load_state_dict(loaded[resumed.state_key])
    assert resumed.best_model_path == ckpt.best_model_path
    assert resumed.best_model_score.item() == pytest.approx(0.3)
    assert resumed.kth_best_model_path == ckpt.kth_best_model_path
    assert resumed.last_model_path == str(tmp_path / "last.ckpt")
    assert {k: v.item() for k, v in resumed.best_k_models.items()} == pytest.approx(
        {str(tmp_path / "epoch=1.ckpt"): 0.3, str(tmp_path / "epoch=2.ckpt"): 0.4}
    )

    # Continuing evicts files written before the resume.
    trainer.callback_metrics["val_loss"] = torch.tensor(0.1)
    trainer.current_epoch, trainer.global_step = 3, 20
    resumed.setup(trainer, None, "fit")
    resumed.on_train_epoch_end(trainer, None)
    assert files_in(tmp_path) == {"epoch=1.ckpt", "epoch=3.ckpt", "last.ckpt", "state.pt"}


def test_load_state_dict_from_other_dirpath_keeps_only_best_path(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val_loss")
    state = ckpt.state_dict()
    state.update(best_model_path="/elsewhere/best.ckpt", best_k_models={"/elsewhere/best.ckpt": torch.tensor(0.1)})
    other = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val_loss")
    with pytest.warns(UserWarning, match="dirpath"):
        other.load_state_dict(state)
    assert other.best_model_path == "/elsewhere/best.ckpt"
    assert other.best_k_models == {}


def test_state_key_names_monitor_mode_and_triggers():
    key = ModelCheckpoint(monitor="val_loss", mode="max", every_n_train_steps=10).state_key
    assert key == (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'max', 'every_n_train_steps': 10, "
        "'every_n_epochs': 0, 'train_time_interval': None}"
    )
    assert key != ModelCheckpoint(monitor="val_loss").state_key


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"save_top_k": -2}, "save_top_k=-2"),
        ({"save_top_k": 3}, "monitor=None"),
        ({"mode": "median"}, "mode='median'"),
        ({"every_n_train_steps": 2, "every_n_epochs": 1}, "only one"),
        ({"every_n_epochs": -1}, "every_n_epochs=-1"),
        ({"train_time_interval": 60}, "train_time_interval=60"),
        ({"save_last": "link"}, "save_last='link'"),
    ],
)
def test_invalid_configuration(kwargs, fragment):
    with pytest.raises(MisconfigurationError, match=re.escape(fragment)):
        ModelCheckpoint(**kwargs)


# ---------------------------------------------------------------- EarlyStopping


def early_stopping_run(tmp_path, callback, values, **overrides):
    trainer = FakeTrainer(tmp_path, **overrides)
    run_epochs(trainer, callback, [{"val_loss": v} for v in values], steps_per_epoch=1)
    return trainer


def test_early_stopping_patience(tmp_path):
    es = EarlyStopping("val_loss", patience=2)
    trainer = early_stopping_run(tmp_path, es, [1.0, 0.8, 0.9, 0.85, 0.7])
    assert trainer.should_stop
    assert es.stopped_epoch == 3 and trainer.current_epoch == 3
    assert es.wait_count == 2
    assert es.best_score.item() == pytest.approx(0.8)
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert "did not improve" in es.stopping_reason_message
    assert trainer.strategy.decisions[-1] == (True, False)


def test_early_stopping_min_delta_and_max_mode(tmp_path):
    es = EarlyStopping("val_loss", min_delta=0.1, patience=2)
    trainer = early_stopping_run(tmp_path, es, [1.0, 0.95, 0.92, 0.5])
    assert trainer.should_stop and es.stopped_epoch == 2  # 0.05 and 0.08 gains are below min_delta

    es = EarlyStopping("val_loss", mode="max", patience=2)
    trainer = early_stopping_run(tmp_path, es, [0.1, 0.2, 0.3, 0.4])
    assert not trainer.should_stop
    assert es.best_score.item() == pytest.approx(0.4)
    assert es.stopping_reason == EarlyStoppingReason.NOT_STOPPED


def test_early_stopping_strict(tmp_path):
    trainer = FakeTrainer(tmp_path)
    trainer.callback_metrics = {"val_acc": torch.tensor(0.5)}
    es = EarlyStopping("val_loss")
    es.setup(trainer, None, "fit")
    with pytest.raises(RuntimeError, match="val_acc"):
        es.on_train_epoch_end(trainer, None)

    lenient = EarlyStopping("val_loss", strict=False)
    lenient.setup(trainer, None, "fit")
    lenient.on_train_epoch_end(trainer, None)
    assert not trainer.should_stop and lenient.wait_count == 0


def test_early_stopping_check_finite(tmp_path):
    es = EarlyStopping("val_loss", patience=10)
    trainer = early_stopping_run(tmp_path, es, [1.0, float("nan"), 0.5])
    assert trainer.should_stop and es.stopped_epoch == 1
    assert es.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert "not finite" in es.stopping_reason_message

    es = EarlyStopping("val_loss", patience=10, check_finite=False)
    trainer = early_stopping_run(tmp_path, es, [1.0, float("inf"), 0.5])
    assert not trainer.should_stop and es.best_score.item() == pytest.approx(0.5)


def test_early_stopping_thresholds(tmp_path):
    es = EarlyStopping("val_loss", stopping_threshold=0.3, patience=10)
    trainer = early_stopping_run(tmp_path, es, [1.0, 0.5, 0.29, 0.1])
    assert trainer.should_stop and es.stopped_epoch == 2
    assert es.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD

    es = EarlyStopping("val_loss", divergence_threshold=5.0, patience=10)
    trainer = early_stopping_run(tmp_path, es, [1.0, 4.0, 6.0, 0.1])
    assert trainer.should_stop and es.stopped_epoch == 2
    assert es.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD

    es = EarlyStopping("acc", mode="max", stopping_threshold=0.9)
    trainer = FakeTrainer(tmp_path)
    run_epochs(trainer, es, [{"acc": 0.5}, {"acc": 0.95}, {"acc": 0.99}], steps_per_epoch=1)
    assert trainer.should_stop and es.stopped_epoch == 1


def test_early_stopping_where_it_checks(tmp_path):
    trainer = FakeTrainer(tmp_path, val_check_interval=0.5)
    trainer.callback_metrics = {"val_loss": torch.tensor(1.0)}
    es = EarlyStopping("val_loss", patience=1)
    es.setup(trainer, None, "fit")
    es.on_train_epoch_end(trainer, None)
    assert es.best_score.item() == math.inf  # not checked at train-epoch end
    es.on_validation_end(trainer, None)
    assert es.best_score.item() == 1.0

    trainer.sanity_checking = True
    trainer.callback_metrics = {"val_loss": torch.tensor(2.0)}
    es.on_validation_end(trainer, None)
    assert es.wait_count == 0 and not trainer.should_stop

    trainer = FakeTrainer(tmp_path)
    forced = EarlyStopping("val_loss", check_on_train_epoch_end=False)
    forced.setup(trainer, None, "fit")
    trainer.callback_metrics = {"val_loss": torch.tensor(1.0)}
    forced.on_train_epoch_end(trainer, None)
    assert forced.best_score.item() == math.inf


def test_early_stopping_any_rank_stopping_stops_all(tmp_path):
    trainer = FakeTrainer(tmp_path, strategy=FakeStrategy(force_decision=True))
    es = EarlyStopping("val_loss")
    run_epochs(trainer, es, [{"val_loss": 1.0}], steps_per_epoch=1)
    assert trainer.should_stop and es.stopped_epoch == 0


def test_early_stopping_skipped_with_fast_dev_run(tmp_path):
    es = EarlyStopping("val_loss", patience=1)
    trainer = early_stopping_run(tmp_path, es, [1.0, 2.0, 3.0], fast_dev_run=1)
    assert not trainer.should_stop and es.wait_count == 0


def test_early_stopping_state_dict_round_trip(tmp_path):
    es = EarlyStopping("val_loss", patience=5)
    early_stopping_run(tmp_path, es, [1.0, 0.5, 0.7, 0.8])
    torch.save(es.state_dict(), tmp_path / "es.pt")
    restored = EarlyStopping("val_loss", patience=5)
    restored.load_state_dict(torch.load(tmp_path / "es.pt", weights_only=True))
    assert restored.wait_count == 2
    assert restored.best_score.item() == pytest.approx(0.5)
    assert restored.stopping_reason == EarlyStoppingReason.NOT_STOPPED
    assert restored.state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"

    with pytest.raises(MisconfigurationError, match="mode='median'"):
        EarlyStopping("val_loss", mode="median")


# ---------------------------------------------------------------- LearningRateMonitor


def scheduler_config(scheduler, name=None, interval="epoch"):
    return SimpleNamespace(
        scheduler=scheduler, name=name, interval=interval, frequency=1, monitor=None, strict=True, opt_idx=0
    )


def params(n=1):
    return [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]


def test_lr_monitor_names_and_values(tmp_path):
    sgd = torch.optim.SGD([{"params": params(), "lr": 0.1}, {"params": params(), "lr": 0.01}], lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(params(), lr=1e-3)
    sgd2 = torch.optim.SGD(params(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    trainer = FakeTrainer(
        tmp_path, loggers=[object()], optimizers=[sgd, adam, sgd2], lr_scheduler_configs=[scheduler_config(sched)]
    )
    monitor = LearningRateMonitor()
    monitor.on_train_start(trainer, None)
    assert set(monitor.lrs) == {"lr-SGD/pg1", "lr-SGD/pg2", "lr-Adam", "lr-SGD-1"}

    monitor.on_train_epoch_start(trainer, None)
    step, metrics = trainer.logged[-1]
    assert step == 0
    assert metrics == pytest.approx({"lr-SGD/pg1": 0.1, "lr-SGD/pg2": 0.01, "lr-Adam": 1e-3, "lr-SGD-1": 0.5})
    assert trainer.callback_metrics["lr-SGD/pg2"].item() == pytest.approx(0.01)

    sgd.step()  # no gradients: a no-op that keeps the scheduler from warning
    sched.step()
    trainer.fit_loop_batches_that_stepped = 7
    monitor.on_train_batch_start(trainer, None, None, 0)
    # The epoch-interval scheduler is not logged per step; scheduler-less optimizers are.
    assert trainer.logged[-1] == (7, pytest.approx({"lr-Adam": 1e-3, "lr-SGD-1": 0.5}))
    monitor.on_train_epoch_start(trainer, None)
    assert trainer.logged[-1][1]["lr-SGD/pg1"] == pytest.approx(0.05)
    assert monitor.lrs["lr-SGD/pg1"] == pytest.approx([0.1, 0.05])


def test_lr_monitor_scheduler_name_intervals_and_extras(tmp_path):
    sgd = torch.optim.SGD(params(), lr=0.2, momentum=0.8, weight_decay=0.01)
    adam = torch.optim.AdamW([{"params": params(), "name": "head"}, {"params": params(), "name": "body"}], lr=0.3)
    step_sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)
    trainer = FakeTrainer(
        tmp_path,
        loggers=[object()],
        optimizers=[sgd, adam],
        lr_scheduler_configs=[scheduler_config(step_sched, name="my-lr", interval="step")],
    )
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True, log_weight_decay=True)
    monitor.on_train_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)
    assert trainer.logged == []  # "step" never logs at epoch start
    monitor.on_train_batch_start(trainer, None, None, 0)
    _, metrics = trainer.logged[-1]
    assert metrics == pytest.approx({
        "my-lr": 0.2, "my-lr-momentum": 0.8, "my-lr-weight_decay": 0.01,
        "lr-AdamW/head": 0.3, "lr-AdamW/head-momentum": 0.9, "lr-AdamW/head-weight_decay": 0.01,
        "lr-AdamW/body": 0.3, "lr-AdamW/body-momentum": 0.9, "lr-AdamW/body-weight_decay": 0.01,
    })
    assert monitor.last_momentum_values["my-lr-momentum"] == pytest.approx(0.8)

    epoch_only = LearningRateMonitor(logging_interval="epoch")
    trainer.logged.clear()
    epoch_only.on_train_start(trainer, None)
    epoch_only.on_train_batch_start(trainer, None, None, 0)
    assert trainer.logged == []
    epoch_only.on_train_epoch_start(trainer, None)
    assert set(trainer.logged[-1][1]) == {"my-lr", "lr-AdamW/head", "lr-AdamW/body"}


def test_lr_monitor_needs_a_logger(tmp_path):
    trainer = FakeTrainer(tmp_path, optimizers=[torch.optim.SGD(params(), lr=0.1)])
    with pytest.raises(MisconfigurationError, match="logger"):
        LearningRateMonitor().on_train_start(trainer, None)


def test_lr_monitor_rejects_bad_input(tmp_path):
    with pytest.raises(MisconfigurationError, match="logging_interval='batch'"):
        LearningRateMonitor(logging_interval="batch")
    opt = torch.optim.SGD([{"params": params(), "name": "a"}, {"params": params(), "name": "a"}], lr=0.1)
    trainer = FakeTrainer(tmp_path, loggers=[object()], optimizers=[opt])
    with pytest.raises(MisconfigurationError, match="'a'"):
        LearningRateMonitor().on_train_start(trainer, None)


def test_builtin_callbacks_are_callbacks():
    for cb in (ModelCheckpoint(), EarlyStopping("x"), LearningRateMonitor()):
        assert isinstance(cb, Callback)


_VERBOSE_SCRIPT = """
import logging, sys
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.WARNING)  # the program decides what is shown
import torch
from torch.utils.data import DataLoader, TensorDataset
from runtime import EarlyStopping, LightningModule, seed_everything
from launcher import Trainer

class Constant(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
    def training_step(self, batch, batch_idx):
        return (self.w - batch[0]).pow(2).mean()
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", 1.0)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

seed_everything(7)
data = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
Trainer(max_epochs=5, num_workers=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=sys.argv[2], callbacks=[EarlyStopping("val_loss", patience=1, verbose=True)]).fit(
    Constant(), data, data)
"""


@pytest.mark.parametrize("logging_setup", ["none", "configured"])
def test_verbose_messages_reach_the_console_unless_the_program_configures_logging(tmp_path, logging_setup):
    import subprocess
    import sys

    script = tmp_path / "verbose.py"
    script.write_text(_VERBOSE_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), logging_setup, str(tmp_path)], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert done.returncode == 0, done.stderr
    messages = ["Seed set to 7", "did not improve in the last 1 checks"]
    if logging_setup == "none":  # as with Lightning: shown without any logging setup
        assert all(m in done.stderr for m in messages), done.stderr
    else:
        assert not any(m in done.stderr for m in messages), done.stderr
