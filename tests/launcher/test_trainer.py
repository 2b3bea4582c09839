"""The Trainer facade in-process (num_workers=0): run directory, loggers, checkpoints, resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import CSVLogger, TensorBoardLogger, Trainer
from launcher.spec import SpecError
from runtime import LightningModule, ModelCheckpoint, seed_everything
from runtime.sinks import MetricsSink


class Regressor(LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loaders(n: int = 40, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    ds = TensorDataset(x, x.sum(dim=1, keepdim=True))
    return DataLoader(ds, batch_size=batch), DataLoader(ds, batch_size=batch)


def test_fit_writes_run_directory_with_tensorboard_csv_checkpoints_and_status(tmp_path):
    seed_everything(0)
    model = Regressor()
    trainer = Trainer(
        max_epochs=3,
        default_root_dir=str(tmp_path),
        run_name="exp1",
        log_every_n_steps=2,
        logger=[TensorBoardLogger(), CSVLogger()],
        enable_progress_bar=False,
    )
    trainer.fit(model, *_loaders())
    run = tmp_path / "exp1"

    spec = json.loads((run / "spec.json").read_text())
    assert spec["max_epochs"] == 3 and spec["run_name"] == "exp1"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["global_step"] == 15 and status["epoch"] == 3
    assert os.path.exists(status["last_checkpoint"])

    # TensorBoard event files the driver wrote, read the way `tensorboard --logdir` reads them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train_loss_step", "train_loss_epoch", "val_loss"} <= set(scalars)
    val = acc.Scalars("val_loss")
    assert len(val) == 3
    assert val[-1].value == pytest.approx(float(trainer.callback_metrics["val_loss"]), abs=1e-6)
    assert [e.step for e in acc.Scalars("train_loss_step")] == [1, 3, 5, 7, 9, 11, 13]

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epoch_rows = [r for r in rows if r.get("train_loss_epoch")]
    assert len(epoch_rows) == 3
    assert float(epoch_rows[-1]["train_loss_epoch"]) == pytest.approx(
        float(trainer.callback_metrics["train_loss_epoch"]), abs=1e-6
    )

    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert "last.ckpt" in ckpts and "epoch=2-step=15.ckpt" in ckpts
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value)
    assert saved["hyper_parameters"] == {"hidden": 8, "lr": 0.05}


def test_trained_weights_stay_in_the_driver_model_and_load_from_checkpoint(tmp_path):
    seed_everything(1)
    model = Regressor(hidden=6)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    trainer.fit(model, *_loaders())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.global_step == 10 and trainer.current_epoch == 2

    restored = Regressor.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert restored.hparams.hidden == 6
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    override = Regressor.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, lr=0.5)
    assert override.hparams.lr == 0.5


def test_resume_with_ckpt_path_last_matches_uninterrupted(tmp_path):
    seed_everything(3)
    reference = Regressor()
    Trainer(max_epochs=4, default_root_dir=str(tmp_path / "a"), logger=False, enable_progress_bar=False).fit(
        reference, *_loaders()
    )

    seed_everything(3)
    first = Regressor()
    Trainer(max_epochs=2, default_root_dir=str(tmp_path / "b"), run_name="r", logger=False, enable_progress_bar=False).fit(
        first, *_loaders()
    )
    resumed = Regressor()
    trainer = Trainer(max_epochs=4, default_root_dir=str(tmp_path / "b"), run_name="r", logger=False, enable_progress_bar=False)
    trainer.fit(resumed, *_loaders(), ckpt_path="last")
    assert trainer.global_step == 20
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_validate_and_test_return_one_dict_per_dataloader(tmp_path):
    class WithTest(Regressor):
        def test_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.log("test_loss", nn.functional.mse_loss(self.net(x), y))

    model = WithTest()
    trainer = Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    val = trainer.validate(model, _loaders()[1], verbose=False)
    assert list(val[0]) == ["val_loss"]
    a, b = _loaders(n=16)[1], _loaders(n=24)[1]
    results = trainer.test(model, [a, b], verbose=False)
    assert len(results) == 2
    assert set(results[0]) == {"test_loss/dataloader_idx_0"}
    assert set(results[1]) == {"test_loss/dataloader_idx_1"}


def test_predict_returns_batches_in_order(tmp_path):
    model = Regressor()
    x = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    preds = Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False).predict(
        model, DataLoader(x, batch_size=2)
    )
    assert [p.shape[0] for p in preds] == [2, 2, 1]
    with torch.no_grad():
        assert torch.allclose(torch.cat(preds), model(x))


def test_invalid_arguments_fail_before_anything_runs(tmp_path):
    with pytest.raises(SpecError, match="max_epoch.*did you mean 'max_epochs'"):
        Trainer(max_epoch=3, default_root_dir=str(tmp_path))
    with pytest.raises(SpecError, match="precision"):
        Trainer(precision="fp8", default_root_dir=str(tmp_path))
    assert not any(tmp_path.iterdir()), "a rejected spec must not create a run directory"


def test_raylight_ls_lists_runs(tmp_path):
    Trainer(max_epochs=1, default_root_dir=str(tmp_path), run_name="one", logger=False, enable_progress_bar=False).fit(
        Regressor(), *_loaders()
    )
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ls", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    header, row = out.strip().splitlines()
    assert header.split()[:4] == ["RUN", "STATUS", "EPOCH", "STEP"]
    assert row.split()[:4] == ["one", "finished", "1", "5"]
    # A run whose status.json was cut short (a machine that lost power) is listed as such, with the others.
    damaged = tmp_path / "two"
    damaged.mkdir()
    (damaged / "spec.json").write_text((tmp_path / "one" / "spec.json").read_text())
    (damaged / "status.json").write_text('{"status": "runn')
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ls", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert [line.split()[:2] for line in out.strip().splitlines()[1:]] == [["one", "finished"], ["two", "unreadable"]]
    bad = subprocess.run([sys.executable, "-m", "launcher.cli", "ls", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode != 0 and "no such directory" in bad.stderr


def test_raylight_ls_does_not_import_torch(tmp_path):
    """`raylight ls` only reads JSON files: importing torch would make it take seconds instead of a fraction."""
    Trainer(max_epochs=1, default_root_dir=str(tmp_path), run_name="one", logger=False, enable_progress_bar=False).fit(
        Regressor(), *_loaders()
    )
    probe = (
        "import sys\n"
        "from launcher.cli import main\n"
        f"assert main(['ls', {str(tmp_path)!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'launcher.spec', 'pydantic') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "one" in out and "finished" in out
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("deterministic", [True, "warn"])
def test_deterministic_sets_torch_as_lightning_does(deterministic, tmp_path):
    """True: nondeterministic ops raise; "warn": they warn (checked against Lightning 2.6 in a fresh process)."""
    probe = (
        "import os, sys, torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "d = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)\n"
        "if sys.argv[1] == 'lightning':\n"
        "    import lightning.pytorch as pl\n"
        "    pl.Trainer(deterministic=DET, logger=False, default_root_dir=sys.argv[2])  # sets the flags\n"
        "else:\n"
        "    sys.path.insert(0, sys.argv[3])\n"
        "    from tests.launcher.test_trainer import Regressor\n"
        "    from launcher import Trainer\n"
        "    Trainer(deterministic=DET, max_steps=1, num_workers=0, logger=False, enable_progress_bar=False,\n"
        "            default_root_dir=sys.argv[2]).fit(Regressor(), d)\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),\n"
        "      os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n"
    ).replace("DET", repr(deterministic))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    flags = {}
    for framework in ("lightning", "raylight"):
        result = subprocess.run(
            [sys.executable, "-c", probe, framework, str(tmp_path / framework), root],
            capture_output=True, text=True, timeout=120, cwd=root,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        flags[framework] = result.stdout.split("\n")[-2]
    assert flags["raylight"] == flags["lightning"] == f"True {deterministic == 'warn'} :4096:8"


def test_gradient_clip_algorithm_is_case_insensitive_as_in_lightning():
    from launcher.spec import TrainerSpec

    assert TrainerSpec.from_kwargs(gradient_clip_algorithm="NORM").gradient_clip_algorithm == "norm"
    assert TrainerSpec.from_kwargs(gradient_clip_algorithm="Value").gradient_clip_algorithm == "value"


@pytest.mark.parametrize("progress_bar", [True, False])
def test_the_job_kept_for_resume_and_sent_to_workers_follows_the_spec(progress_bar, tmp_path):
    # The fit job is serialised once: kept in the run directory and shipped as is to Ray workers. With the
    # bar off, rank 0 must not send progress that no driver thread reads (the sink would keep every update).
    import cloudpickle

    from launcher.job_file import read_job

    train, val = _loaders()
    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), run_name="job", logger=[CSVLogger()],
                      enable_progress_bar=progress_bar, enable_checkpointing=False)
    trainer.fit(Regressor(), train, val)
    job = cloudpickle.loads(read_job(os.path.join(str(tmp_path), "job"))["job"])
    assert (job.stage, job.progress_bar, job.logger_count) == ("fit", progress_bar, 1)
    assert job.config.max_epochs == 1 and job.config.enable_checkpointing is False


def test_the_job_file_holds_the_module_as_it_was_before_training(tmp_path):
    # The job file is written while training runs; what it holds is the module fit() was given, so that
    # `raylight resume` without a checkpoint starts the run over from the same weights.
    import cloudpickle

    from launcher.job_file import read_job

    train, _ = _loaders()
    model = Regressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(max_epochs=3, default_root_dir=str(tmp_path), run_name="job", logger=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(model, train)
    saved = cloudpickle.loads(read_job(os.path.join(str(tmp_path), "job"))["job"]).module.state_dict()
    assert not torch.equal(model.state_dict()["net.0.weight"], before["net.0.weight"])  # it did train
    for name, value in before.items():
        assert torch.equal(saved[name], value), name


def test_a_job_file_that_cannot_be_written_is_a_warning_and_the_fit_completes(tmp_path):
    from launcher.job_file import JOB_FILE

    run = tmp_path / "job"
    run.mkdir()
    # The job file is written through a temporary file named after the process; a directory in its place
    # makes that write fail as a full or read-only disk would.
    (run / f"{JOB_FILE}.tmp-{os.getpid()}").mkdir()
    train, _ = _loaders()
    model = Regressor()
    before = model.state_dict()["net.0.weight"].clone()
    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), run_name="job", logger=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"the job could not be saved to .*job \(IsADirectoryError.*raylight resume"):
        trainer.fit(model, train)
    assert trainer.global_step == 5
    assert not torch.equal(model.state_dict()["net.0.weight"], before)
    assert not (run / JOB_FILE).exists()
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


class _LockedLogger(MetricsSink):
    """A custom logger holding what cannot be pickled (a lock, as a client or an open file would)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params):
        pass

    def finalize(self, status):
        pass


def test_a_logger_that_cannot_be_pickled_is_a_warning_in_process_and_the_fit_completes(tmp_path):
    logger = _LockedLogger()
    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), run_name="locked", logger=logger,
                      log_every_n_steps=1, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"the job could not be saved .*lock.*raylight resume"):
        trainer.fit(Regressor(), *_loaders())
    assert [step for step, row in logger.rows if "train_loss_step" in row] == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "locked" / "status.json").read_text())["status"] == "finished"


class _Evaluated(Regressor):
    test_step = Regressor.validation_step


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_a_run_directory_made_by_an_evaluation_alone_ends_with_its_status(tmp_path, stage):
    trainer = Trainer(default_root_dir=str(tmp_path), run_name="alone", logger=False, enable_progress_bar=False)
    _, loader = _loaders()
    getattr(trainer, stage)(_Evaluated(), loader, verbose=False)
    assert json.loads((tmp_path / "alone" / "status.json").read_text())["status"] == "finished"

    class Broken(_Evaluated):
        def validation_step(self, batch, batch_idx):
            raise ValueError("broken step")

        test_step = validation_step

    failing = Trainer(default_root_dir=str(tmp_path), run_name=f"broken-{stage}", logger=False,
                      enable_progress_bar=False)
    with pytest.raises(ValueError, match="broken step"):
        getattr(failing, stage)(Broken(), loader, verbose=False)
    assert json.loads((tmp_path / f"broken-{stage}" / "status.json").read_text())["status"] == "failed"


class _OwnCheckpoint(Regressor):
    """Keeps its best epoch by val_loss in a directory of its own, through configure_callbacks (as in Lightning)."""

    def __init__(self, dirpath: str):
        super().__init__()
        self.dirpath = dirpath
        self.val_losses: list[float] = []

    def on_validation_epoch_end(self):
        if self.trainer.state.fn.value == "fit":
            self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

    def configure_callbacks(self):
        return [ModelCheckpoint(dirpath=self.dirpath, monitor="val_loss", save_top_k=1, filename="best-{epoch}",
                                save_last=True)]


def test_a_configure_callbacks_model_checkpoint_is_the_trainers_checkpoint_callback(tmp_path):
    seed_everything(0)
    own = tmp_path / "own"
    model = _OwnCheckpoint(str(own))
    trainer = Trainer(max_epochs=4, default_root_dir=str(tmp_path), run_name="cc", logger=False,
                      enable_progress_bar=False, num_sanity_val_steps=0)
    train, val = _loaders()
    trainer.fit(model, train, val)

    # It replaced the Trainer's own ModelCheckpoint, as in Lightning.
    ckpt = trainer.checkpoint_callback
    assert trainer.checkpoint_callbacks == [ckpt]
    assert [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)] == [ckpt]
    best_epoch = min(range(4), key=model.val_losses.__getitem__)
    assert ckpt.monitor == "val_loss"
    assert ckpt.best_model_path == str(own / f"best-epoch={best_epoch}.ckpt")
    assert float(ckpt.best_model_score) == pytest.approx(model.val_losses[best_epoch])
    assert ckpt.last_model_path == str(own / "last.ckpt")
    status = json.loads((tmp_path / "cc" / "status.json").read_text())
    assert status["best_checkpoint"] == ckpt.best_model_path

    assert trainer.validate(model, val, ckpt_path="best", verbose=False)[0]["val_loss"] == pytest.approx(
        model.val_losses[best_epoch], abs=1e-6
    )
    # "last" is the module's ModelCheckpoint's own last.ckpt: the trained weights, not these.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no last checkpoint" warning
        last = trainer.validate(model, val, ckpt_path="last", verbose=False)[0]["val_loss"]
    assert last == pytest.approx(model.val_losses[-1], abs=1e-6)
    # Each call builds the module's ModelCheckpoint anew; one evaluating a checkpoint takes that checkpoint's
    # state for it, as Lightning does, so "best" still names the fit's best after those validate calls.
    assert trainer.checkpoint_callback.best_model_path == str(own / f"best-epoch={best_epoch}.ckpt")
    again = trainer.validate(model, val, ckpt_path="best", verbose=False)[0]["val_loss"]
    assert again == pytest.approx(model.val_losses[best_epoch], abs=1e-6)


class _Graphed(Regressor):
    """A dropout layer, so that tracing forward() would draw from the generators if it were let to."""

    def __init__(self, with_input: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        if with_input:
            self.example_input_array = torch.zeros(2, 4)


def test_tensorboard_log_graph_traces_the_module_with_its_example_input(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    weights = {}
    for log_graph in (True, False):
        seed_everything(0)
        model = _Graphed()
        logger = TensorBoardLogger(str(tmp_path / "tb"), name=f"graph-{log_graph}", log_graph=log_graph)
        trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=logger, enable_progress_bar=False)
        trainer.fit(model, _loaders()[0])
        acc = EventAccumulator(logger.log_dir)
        acc.Reload()
        assert acc.Tags()["graph"] is log_graph
        weights[log_graph] = [p.detach().clone() for p in model.parameters()]
    # Tracing ran forward() with dropout, and training went on from the same generator state all the same.
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))

    logger = TensorBoardLogger(str(tmp_path / "tb"), name="no-input", log_graph=True)
    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=logger, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"log_graph=True.*no graph of _Graphed.*self\.example_input_array"):
        trainer.fit(_Graphed(with_input=False), _loaders()[0])
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert acc.Tags()["graph"] is False and "train_loss_epoch" in acc.Tags()["scalars"]


def test_loggers_with_a_save_dir_write_where_lightnings_do_and_metrics_csv_has_integer_epochs(tmp_path):
    save_dir = tmp_path / "logs"
    os.makedirs(save_dir / "lightning_logs" / "version_0")  # an earlier run's
    tensorboard, csv_logger = TensorBoardLogger(str(save_dir)), CSVLogger(str(tmp_path / "csv"))
    trainer = Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=[tensorboard, csv_logger],
                      log_every_n_steps=2, enable_progress_bar=False)
    trainer.fit(Regressor(), *_loaders())
    # Lightning's default name, and the next free version.
    assert tensorboard.log_dir == str(save_dir / "lightning_logs" / "version_1") == trainer.log_dir
    assert csv_logger.log_dir == str(tmp_path / "csv" / "lightning_logs" / "version_0")

    with open(tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["epoch"] for row in rows} == {"0", "1"}  # as Lightning writes them, not 0.0 and 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard.log_dir)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("hp_metric")] == [(0, -1.0)]  # default_hp_metric=True


class _CountsSteps(Regressor):
    def __init__(self):
        super().__init__()
        self.steps_trained = 0

    def training_step(self, batch, batch_idx):
        self.steps_trained += 1
        return super().training_step(batch, batch_idx)


def test_a_run_repeated_under_its_run_name_keeps_the_first_runs_last_checkpoint_and_resumes_from_its_own(tmp_path):
    """A second fresh fit into the same run directory gets last-v1.ckpt; "last" and `raylight resume` take the
    newest of them, the second run's, not the first run's last.ckpt."""
    def trainer(epochs):
        return Trainer(max_epochs=epochs, default_root_dir=str(tmp_path), run_name="same", logger=False,
                       enable_progress_bar=False, num_sanity_val_steps=0)

    trainer(1).fit(_CountsSteps(), *_loaders())  # 5 steps an epoch
    with pytest.warns(UserWarning, match=r"already holds 2 file"):
        trainer(2).fit(_CountsSteps(), *_loaders())
    checkpoints = tmp_path / "same" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last-v1.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 5
    assert torch.load(checkpoints / "last-v1.ckpt", weights_only=True)["global_step"] == 10

    resumed = _CountsSteps()
    third = trainer(3)
    third.fit(resumed, *_loaders(), ckpt_path="last")
    assert (resumed.steps_trained, third.global_step) == (5, 15)  # from the second run's step 10
    assert third.checkpoint_callback.last_model_path == str(checkpoints / "last-v1.ckpt")
    from launcher.run_dir import RunDir

    assert RunDir(str(tmp_path / "same")).newest_last_checkpoint() == str(checkpoints / "last-v1.ckpt")
