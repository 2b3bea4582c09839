"""save_hyperparameters / load_from_checkpoint, EarlyStopping and ModelCheckpoint(monitor, save_top_k) parity.

Each side loads only checkpoints it wrote itself; the restored modules are
compared with each other.
"""

from __future__ import annotations

import os
from argparse import Namespace

import pytest
import torch

from runtime.checkpoint.io import CheckpointError
from tests.parity.bodies import Regressor
from tests.parity.harness import (
    PL,
    RL,
    as_float,
    assert_fit_parity,
    assert_same_weights,
    build_pair,
    loader,
    module_class,
    recording_logger,
    run_both,
)


def _train_val():
    return {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)}


# --------------------------------------------------------------------- hyperparameters


class HParams(Regressor):
    def __init__(self, lr: float = 0.05, hidden: int = 8, name: str = "net", layers=(1, 2), opt=None, **extra):
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters()


class HParamsIgnore(Regressor):
    def __init__(self, lr: float = 0.05, hidden: int = 8, name: str = "net"):
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters(ignore=["name"])


class HParamsNamed(Regressor):
    def __init__(self, lr: float = 0.05, hidden: int = 8, name: str = "net"):
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters("lr", "hidden")


class HParamsDict(Regressor):
    def __init__(self, config: dict | None = None):
        config = config or {"lr": 0.05, "hidden": 8}
        super().__init__(lr=config["lr"], hidden=config["hidden"])
        self.save_hyperparameters(config)


class HParamsNamespace(Regressor):
    """The argparse pattern: one Namespace argument, recorded as a dict and passed back to it as one."""

    def __init__(self, args=None):
        lr, hidden = (args.lr, args.hidden) if isinstance(args, Namespace) else (args["lr"], args["hidden"])
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters(args)


class HParamsChangedAfterSaving(Regressor):
    """A value added to self.hparams after save_hyperparameters: in the checkpoint, not an __init__ argument."""

    def __init__(self, lr: float = 0.05, hidden: int = 8):
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters()
        self.hparams.width = hidden * 2


class HParamsFromAHelperMethod(Regressor):
    """save_hyperparameters() in a method that __init__ calls: the arguments are still __init__'s."""

    def __init__(self, lr: float = 0.05, hidden: int = 8):
        super().__init__(lr=lr, hidden=hidden)
        self._record()

    def _record(self):
        self.save_hyperparameters()


HPARAM_CASES = {
    "all-args": (HParams, dict(lr=0.1, hidden=6, name="x", layers=[3, 4], opt={"momentum": 0.5}, extra_kw=7)),
    "ignore": (HParamsIgnore, dict(lr=0.1, hidden=6, name="x")),
    "named": (HParamsNamed, dict(lr=0.1, hidden=6, name="x")),
    "dict": (HParamsDict, dict(config={"lr": 0.1, "hidden": 6})),
    "namespace": (HParamsNamespace, dict(args=Namespace(lr=0.1, hidden=6))),
    "changed-after-saving": (HParamsChangedAfterSaving, dict(lr=0.1, hidden=6)),
    "from-a-helper-method": (HParamsFromAHelperMethod, dict(lr=0.1, hidden=6)),
}


@pytest.mark.parametrize("case", list(HPARAM_CASES))
def test_save_hyperparameters(case):
    body, kwargs = HPARAM_CASES[case]
    plm, rlm = build_pair(body, **kwargs)
    assert dict(rlm.hparams) == dict(plm.hparams)
    assert dict(rlm.hparams_initial) == dict(plm.hparams_initial)
    assert rlm.hparams.lr == plm.hparams.lr == 0.1  # attribute access


def _fit_with_checkpoint(tmp_path, body, kwargs, logger=False):
    plm, rlm = build_pair(body, **kwargs)
    runs = {}
    for side, model in ((PL, plm), (RL, rlm)):
        dirpath = str(tmp_path / side.name / "ckpts")
        ckpt = side.ModelCheckpoint(dirpath=dirpath, save_last=True)
        extra = {}
        if logger:
            extra = dict(logger=[recording_logger(side)])
        trainer = side.trainer(
            str(tmp_path / side.name), max_epochs=2, enable_checkpointing=True, callbacks=[ckpt], **extra
        )
        torch.manual_seed(1)
        trainer.fit(model, **_train_val())
        runs[side.name] = (trainer, model, ckpt, extra.get("logger", [None])[0])
    return runs["lightning"], runs["raylight"]


@pytest.mark.parametrize("case", list(HPARAM_CASES))
def test_load_from_checkpoint_restores_hparams_and_weights(tmp_path, case):
    body, kwargs = HPARAM_CASES[case]
    (pl_trainer, plm, pl_ckpt, _), (rl_trainer, rlm, rl_ckpt, _) = _fit_with_checkpoint(tmp_path, body, kwargs)
    pl_loaded = module_class(body, PL).load_from_checkpoint(pl_ckpt.last_model_path)
    rl_loaded = module_class(body, RL).load_from_checkpoint(rl_ckpt.last_model_path)
    assert dict(rl_loaded.hparams) == dict(pl_loaded.hparams)
    assert_same_weights(pl_loaded, rl_loaded)
    assert_same_weights(plm, rl_loaded)  # last.ckpt holds the final weights


def test_load_from_checkpoint_with_overrides(tmp_path):
    body, kwargs = HPARAM_CASES["all-args"]
    (_, _, pl_ckpt, _), (_, _, rl_ckpt, _) = _fit_with_checkpoint(tmp_path, body, kwargs)
    pl_loaded = module_class(body, PL).load_from_checkpoint(pl_ckpt.last_model_path, lr=0.5, name="y")
    rl_loaded = module_class(body, RL).load_from_checkpoint(rl_ckpt.last_model_path, lr=0.5, name="y")
    assert dict(rl_loaded.hparams) == dict(pl_loaded.hparams)
    assert rl_loaded.lr == pl_loaded.lr == 0.5
    assert_same_weights(pl_loaded, rl_loaded)


def test_checkpoint_contents(tmp_path):
    body, kwargs = HPARAM_CASES["all-args"]
    (_, _, pl_ckpt, pl_logger), (_, _, rl_ckpt, rl_logger) = _fit_with_checkpoint(tmp_path, body, kwargs, logger=True)
    pl_dict = torch.load(pl_ckpt.last_model_path, weights_only=False)
    rl_dict = torch.load(rl_ckpt.last_model_path, weights_only=True)
    for key in ("epoch", "global_step", "hyper_parameters"):
        assert rl_dict[key] == pl_dict[key], (
            f"checkpoint[{key!r}]: lightning {pl_dict[key]!r}, raylight {rl_dict[key]!r}"
        )
    for key in pl_dict["state_dict"]:
        assert torch.allclose(pl_dict["state_dict"][key], rl_dict["state_dict"][key], atol=1e-6, rtol=0), key
    pl_opt, rl_opt = pl_dict["optimizer_states"], rl_dict["optimizer_states"]
    assert len(rl_opt) == len(pl_opt) == 1
    assert rl_opt[0]["param_groups"] == pl_opt[0]["param_groups"]
    for idx, state in pl_opt[0]["state"].items():
        for name, value in state.items():
            assert torch.allclose(value, rl_opt[0]["state"][idx][name], atol=1e-6, rtol=0), (idx, name)
    # The hyperparameters reach the logger once, as Lightning sends them.
    assert rl_logger.hparams == pl_logger.hparams


# ---------------------------------------------------------------------- monitored metric


# A scripted validation metric per validation pass, independent of the weights.
SCORES = [5.0, 4.0, 4.5, 3.0, 3.5, 3.6, 3.7, 2.0, 2.5, 2.6]


class Scripted(Regressor):
    def __init__(self, per_validation: bool = False) -> None:
        super().__init__()
        self.per_validation = per_validation
        self.validations = 0

    def on_validation_epoch_start(self):
        if not self.trainer.sanity_checking:
            self.validations += 1

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        index = self.validations - 1 if self.per_validation else self.current_epoch
        self.log("val_score", SCORES[index])
        self.log("val_neg_score", -SCORES[index])

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_score", SCORES[self.current_epoch], on_step=False, on_epoch=True)
        return loss


def _early_stopping_state(es):
    return {
        "stopped_epoch": es.stopped_epoch,
        "wait_count": es.wait_count,
        "best_score": as_float(es.best_score),
    }


ES_CASES = {
    "val-min-patience-1": (dict(monitor="val_score", patience=1), dict()),
    "val-max-patience-2": (dict(monitor="val_neg_score", mode="max", patience=2), dict()),
    "val-min-delta": (dict(monitor="val_score", patience=1, min_delta=0.6), dict()),
    "train-metric-no-val": (dict(monitor="train_score", patience=1), dict(limit_val_batches=0)),
    "stopping-threshold": (dict(monitor="val_score", patience=10, stopping_threshold=3.2), dict()),
    "val-twice-per-epoch": (dict(monitor="val_score", patience=2), dict(val_check_interval=0.5)),
    "val-every-2-epochs": (dict(monitor="val_score", patience=1), dict(check_val_every_n_epoch=2)),
}


@pytest.mark.parametrize("case", list(ES_CASES))
def test_early_stopping(tmp_path, case):
    es_args, trainer_args = ES_CASES[case]
    pl_run, rl_run = run_both(
        Scripted,
        tmp_path=tmp_path,
        init_args={"per_validation": "val_check_interval" in trainer_args or "check_val_every_n_epoch" in trainer_args},
        data=_train_val,
        trainer_args=dict(max_epochs=10, num_sanity_val_steps=0, limit_train_batches=2, **trainer_args),
        callbacks=lambda side: [side.EarlyStopping(**es_args)],
    )
    assert pl_run.trainer.current_epoch < 10, "the oracle should stop early in this scenario"
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.trainer.should_stop == pl_run.trainer.should_stop
    assert _early_stopping_state(rl_run.callbacks[0]) == _early_stopping_state(pl_run.callbacks[0])


CKPT_CASES = {
    "top2-min": dict(monitor="val_score", save_top_k=2),
    "top2-max-filename": dict(
        monitor="val_neg_score", mode="max", save_top_k=2, filename="{epoch}-{val_neg_score:.2f}"
    ),
    "top2-save-last": dict(monitor="val_score", save_top_k=2, save_last=True),
    "top2-every-2-epochs": dict(monitor="val_score", save_top_k=2, every_n_epochs=2),
    "top2-every-3-steps": dict(monitor="val_score", save_top_k=2, every_n_train_steps=3),
    "no-monitor": dict(),
    "save-all": dict(monitor="val_score", save_top_k=-1),
}


# Step schedules whose save falls on an epoch's last batch with a validation right after it: the save waits for
# that validation's value (ranking by the previous one's would keep a different set of files).
CKPT_STEP_CASES_BEFORE_VALIDATION = {
    "every-2-steps-val-twice-per-epoch": (dict(every_n_train_steps=2), dict(val_check_interval=0.5, max_epochs=4)),
    "every-4-steps-val-every-2-epochs": (dict(every_n_train_steps=4), dict(check_val_every_n_epoch=2)),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_model_checkpoint(tmp_path, case):
    _assert_model_checkpoint_parity(tmp_path, CKPT_CASES[case], {})


@pytest.mark.parametrize("case", list(CKPT_STEP_CASES_BEFORE_VALIDATION))
def test_model_checkpoint_on_a_step_schedule_before_validation(tmp_path, case):
    ckpt_args, trainer_args = CKPT_STEP_CASES_BEFORE_VALIDATION[case]
    _assert_model_checkpoint_parity(
        tmp_path, dict(monitor="val_score", save_top_k=2, **ckpt_args), trainer_args, per_validation=True
    )


def _assert_model_checkpoint_parity(tmp_path, ckpt_args, trainer_args, per_validation=False):
    pl_run, rl_run = run_both(
        Scripted,
        tmp_path=tmp_path,
        init_args={"per_validation": per_validation},
        data=_train_val,
        trainer_args={
            **dict(max_epochs=6, num_sanity_val_steps=0, limit_train_batches=2, enable_checkpointing=True),
            **trainer_args,
        },
        callbacks=lambda side: [side.ModelCheckpoint(dirpath=str(tmp_path / side.name / "ckpts"), **ckpt_args)],
    )
    assert_fit_parity(pl_run, rl_run)
    pl_cb, rl_cb = pl_run.callbacks[0], rl_run.callbacks[0]
    files = lambda cb: sorted(os.listdir(cb.dirpath))  # noqa: E731
    assert files(rl_cb) == files(pl_cb)
    assert os.path.basename(rl_cb.best_model_path) == os.path.basename(pl_cb.best_model_path)
    assert os.path.basename(rl_cb.last_model_path) == os.path.basename(pl_cb.last_model_path)
    if pl_cb.best_model_score is None:
        assert rl_cb.best_model_score is None
    else:
        assert as_float(rl_cb.best_model_score) == pytest.approx(as_float(pl_cb.best_model_score), abs=1e-6)
    best_k = lambda cb: {os.path.basename(p): round(as_float(v), 6) for p, v in cb.best_k_models.items()}  # noqa: E731
    assert best_k(rl_cb) == best_k(pl_cb)
    # Each side's best checkpoint holds the same epoch/step and weights.
    if pl_cb.best_model_path:
        pl_best = torch.load(pl_cb.best_model_path, weights_only=False)
        rl_best = torch.load(rl_cb.best_model_path, weights_only=True)
        assert (rl_best["epoch"], rl_best["global_step"]) == (pl_best["epoch"], pl_best["global_step"])
        for key in pl_best["state_dict"]:
            assert torch.allclose(pl_best["state_dict"][key], rl_best["state_dict"][key], atol=1e-6, rtol=0), key


def _fit_into(tmp_path, directory_of, callbacks_of, max_epochs=3):
    """Fit Scripted on both sides with ``callbacks_of(side, directory)``; returns the runs and each side's directory."""
    runs = run_both(
        Scripted,
        tmp_path=tmp_path,
        data=_train_val,
        trainer_args=dict(
            max_epochs=max_epochs, num_sanity_val_steps=0, limit_train_batches=2, enable_checkpointing=True
        ),
        callbacks=lambda side: callbacks_of(side, directory_of(side)),
    )
    return runs


def test_two_model_checkpoints_sharing_a_directory_keep_each_others_files(tmp_path):
    directory_of = lambda side: str(tmp_path / side.name / "shared")  # noqa: E731
    pl_run, rl_run = _fit_into(
        tmp_path,
        directory_of,
        lambda side, d: [
            side.ModelCheckpoint(dirpath=d, monitor="val_score", mode="min", save_last=True),
            side.ModelCheckpoint(dirpath=d, monitor="val_score", mode="max", save_last=True),
        ],
    )
    assert sorted(os.listdir(directory_of(RL))) == sorted(os.listdir(directory_of(PL)))
    for pl_cb, rl_cb in zip(pl_run.callbacks, rl_run.callbacks):
        assert os.path.basename(rl_cb.best_model_path) == os.path.basename(pl_cb.best_model_path)
        assert os.path.basename(rl_cb.last_model_path) == os.path.basename(pl_cb.last_model_path)
        # Each callback's best checkpoint is still there, and is the one it ranked best.
        best = torch.load(rl_cb.best_model_path, weights_only=True)
        assert best["global_step"] == torch.load(pl_cb.best_model_path, weights_only=False)["global_step"]


def test_a_second_run_into_the_same_directory_keeps_the_first_runs_checkpoint(tmp_path):
    directory_of = lambda side: str(tmp_path / side.name / "ckpts")  # noqa: E731
    callbacks_of = lambda side, d: [side.ModelCheckpoint(dirpath=d, filename="model", monitor="val_score")]  # noqa: E731
    _fit_into(tmp_path, directory_of, callbacks_of, max_epochs=1)
    first = torch.load(os.path.join(directory_of(RL), "model.ckpt"), weights_only=True)
    with pytest.warns(UserWarning, match=r"already holds 1 file\(s\), e.g. 'model.ckpt'"):
        pl_run, rl_run = _fit_into(tmp_path, directory_of, callbacks_of, max_epochs=2)
    assert sorted(os.listdir(directory_of(RL))) == sorted(os.listdir(directory_of(PL))) == ["model-v1.ckpt", "model.ckpt"]
    assert os.path.basename(rl_run.callbacks[0].best_model_path) == os.path.basename(pl_run.callbacks[0].best_model_path)
    kept = torch.load(os.path.join(directory_of(RL), "model.ckpt"), weights_only=True)
    assert kept["global_step"] == first["global_step"]
    assert all(torch.equal(kept["state_dict"][k], v) for k, v in first["state_dict"].items())


def test_a_resumed_run_keeps_writing_its_own_last_checkpoint(tmp_path):
    from launcher import Trainer

    directory = tmp_path / "ckpts"
    model = module_class(Scripted, RL)()
    fit = lambda epochs, ckpt_path=None: Trainer(  # noqa: E731
        max_epochs=epochs, num_workers=0, limit_train_batches=2, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
        enable_progress_bar=False, logger=False, callbacks=[runtime_checkpoint(directory)],
    ).fit(model, ckpt_path=ckpt_path, **_train_val())
    fit(1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already holds" warning: these are the run's own files
        fit(2, ckpt_path=str(directory / "last.ckpt"))
    assert sorted(os.listdir(directory)) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    assert torch.load(directory / "last.ckpt", weights_only=True)["global_step"] == 4


def runtime_checkpoint(directory):
    return RL.ModelCheckpoint(dirpath=str(directory), monitor="val_score", save_top_k=-1, save_last=True)


class HParamsWithExtraLayer(HParams):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra = torch.nn.Linear(2, 2)


def test_load_from_checkpoint_not_strict_warns_about_the_keys_it_left(tmp_path):
    body, kwargs = HPARAM_CASES["all-args"]
    (_, plm, pl_ckpt, _), (_, rlm, rl_ckpt, _) = _fit_with_checkpoint(tmp_path, body, kwargs)
    with pytest.warns(UserWarning, match=r"extra\.weight"):
        module_class(HParamsWithExtraLayer, PL).load_from_checkpoint(pl_ckpt.last_model_path, strict=False)
    with pytest.warns(UserWarning, match=r"strict=False\): keys not in the checkpoint.*'extra\.weight', 'extra\.bias'"):
        loaded = module_class(HParamsWithExtraLayer, RL).load_from_checkpoint(rl_ckpt.last_model_path, strict=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rlm.state_dict().items())


def test_lightning_loads_a_raylight_checkpoint_and_raylight_refuses_to_resume_a_lightning_one(tmp_path):
    body, kwargs = HPARAM_CASES["all-args"]
    (pl_trainer, plm, pl_ckpt, _), (_, rlm, rl_ckpt, _) = _fit_with_checkpoint(tmp_path, body, kwargs)
    # Lightning's loader reads raylight's checkpoint: the same hyperparameters and weights.
    by_lightning = module_class(body, PL).load_from_checkpoint(rl_ckpt.last_model_path, weights_only=True)
    assert dict(by_lightning.hparams) == dict(rlm.hparams)
    assert_same_weights(by_lightning, rlm)
    # Lightning's loop state has another layout: resuming from it is refused with what to do instead.
    resumed = module_class(body, RL)(**kwargs)
    trainer = RL.trainer(str(tmp_path / "resume"), max_epochs=3)
    with pytest.raises(CheckpointError, match=r"written by Lightning 2\.6\.\d+.*load_from_checkpoint"):
        trainer.fit(resumed, **_train_val(), ckpt_path=pl_ckpt.last_model_path)


@pytest.mark.parametrize("side", [PL, RL], ids=lambda side: side.name)
def test_two_callbacks_keeping_state_under_one_key_are_refused(tmp_path, side):
    callbacks = [side.ModelCheckpoint(dirpath=str(tmp_path / "a"), monitor="val_score"),
                 side.ModelCheckpoint(dirpath=str(tmp_path / "b"), monitor="val_score", save_top_k=3)]
    with pytest.raises(RuntimeError, match="more than one stateful callback|under the same key"):
        trainer = side.trainer(str(tmp_path / side.name), callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(module_class(Scripted, side)(), **_train_val())
