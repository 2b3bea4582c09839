"""The driver's tqdm progress bar, as a user sees it on stderr."""

from __future__ import annotations

import io
import pickle

from launcher.progress import ProgressBar, _format_value
from runtime.sinks import MetricsSink, Progress


def _fit(bar: ProgressBar, epochs: int = 2, batches: int = 4) -> None:
    for i in range(1, 3):
        bar.progress(Progress("sanity_check", 0, i, 2, 0))
    for epoch in range(epochs):
        for i in range(1, batches + 1):
            bar.progress(Progress("train", epoch, i, batches, epoch * batches + i, {"loss": 0.123456 * (epoch + 1)}))
        for i in range(1, 3):
            bar.progress(Progress("validate", epoch, i, 2, (epoch + 1) * batches, {"val_acc": 0.87654}))
    bar.finalize("finished")


def test_is_a_metrics_sink():
    assert isinstance(ProgressBar(), MetricsSink)


def test_shows_epoch_and_prog_bar_metric_on_stderr(capsys):
    _fit(ProgressBar(mininterval=0))
    err = capsys.readouterr().err
    assert "Epoch 0" in err and "Epoch 1" in err
    assert "loss=0.123" in err and "loss=0.247" in err  # 3 significant digits
    assert "Sanity Checking" in err
    assert "Validation" in err and "val_acc=0.877" in err
    assert "4/4" in err
    assert capsys.readouterr().out == ""


def test_evaluation_stage_names(capsys):
    bar = ProgressBar(mininterval=0)
    for stage, name in [("validate", "Validation"), ("test", "Testing"), ("predict", "Predicting")]:
        for i in range(1, 4):
            bar.progress(Progress(stage, 0, i, 3, 0, {"acc": 0.5}))
        err = capsys.readouterr().err
        assert name in err and "3/3" in err and "acc=0.500" in err
    bar.finalize("finished")


def test_unknown_total_is_shown_as_a_count(capsys):
    bar = ProgressBar(mininterval=0)
    for i in range(1, 6):
        bar.progress(Progress("train", 0, i, None, i))
    bar.finalize("finished")
    err = capsys.readouterr().err
    assert "Epoch 0" in err and "5it" in err


def test_disabled_bar_writes_nothing(capsys):
    _fit(ProgressBar(enabled=False, mininterval=0))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_logger_calls_are_no_ops(capsys):
    bar = ProgressBar()
    bar.log_metrics({"loss": 1.0}, step=1)
    bar.log_hyperparams({"lr": 0.1})
    bar.finalize("finished")
    assert capsys.readouterr().err == ""


def test_explicit_file_and_pickling():
    stream = io.StringIO()
    bar = ProgressBar(file=stream, mininterval=0)
    bar.progress(Progress("train", 3, 1, 2, 1, {"loss": 1.0}))
    copy = pickle.loads(pickle.dumps(ProgressBar()))
    assert copy.enabled
    bar.finalize("finished")
    assert "Epoch 3" in stream.getvalue() and "loss=1.000" in stream.getvalue()


def test_number_formatting():
    assert _format_value(0.123456) == "0.123"
    assert _format_value(0.5) == "0.500"
    assert _format_value(12.0) == "12.00"
    assert _format_value(7) == "7"
    assert _format_value(1e-5) == "1e-5"
    assert _format_value(float("nan")) == "nan"


class _CopyingSink:
    """Hands the bar a pickled copy of each update, as the Ray path does (worker -> sink actor -> driver)."""

    def __init__(self, bar: ProgressBar):
        self.bar = bar

    def log_metrics(self, metrics, step) -> None:
        pass

    def log_hyperparams(self, params) -> None:
        pass

    def progress(self, update: Progress) -> None:
        self.bar.progress(pickle.loads(pickle.dumps(update)))

    def finalize(self, status: str) -> None:
        self.bar.finalize(status)


def test_final_training_bar_shows_the_last_validations_metrics_when_updates_are_copies():
    """Each epoch's validation logs val_acc = 0.5 + epoch/10: the last bar must show 0.700, not the epoch
    before's 0.600 (the metrics its last training batch carried)."""
    import torch
    from torch.utils.data import DataLoader

    from runtime import LightningModule
    from runtime.config import RunConfig
    from runtime.engine import Engine

    class Model(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_acc", 0.5 + self.current_epoch / 10, prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    stream = io.StringIO()
    sink = _CopyingSink(ProgressBar(file=stream, mininterval=0))
    engine = Engine(RunConfig(max_epochs=3, num_sanity_val_steps=0, enable_checkpointing=False), metrics_sink=sink)
    data = DataLoader(torch.randn(8, 2), batch_size=4)
    engine.fit(Model(), data, data)
    frames = [f for f in stream.getvalue().replace("\r", "\n").splitlines() if f.startswith("Epoch 2")]
    assert "val_acc=0.700" in frames[-1], frames[-1]


def test_prog_bar_values_are_floats_where_they_are_read():
    # The engine keeps a step's progress-bar values as tensors (on a GPU each float() waits for the GPU);
    # trainer.progress_bar_metrics, as in Lightning, and the bar show floats.
    import torch
    from torch.utils.data import DataLoader

    from launcher import Trainer
    from runtime import LightningModule

    class Model(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            self.log("train_loss", loss, prog_bar=True)
            self.last_loss = float(loss.detach())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    stream = io.StringIO()
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer._progress = ProgressBar(file=stream, mininterval=0)
    model = Model()
    trainer.fit(model, DataLoader(torch.randn(8, 2), batch_size=4))
    assert trainer.progress_bar_metrics == {"train_loss": model.last_loss}
    assert type(trainer.progress_bar_metrics["train_loss"]) is float
    assert f"train_loss={_format_value(model.last_loss)}" in stream.getvalue().replace("\r", "\n").splitlines()[-1]


def test_a_ray_worker_sends_progress_bar_values_as_floats():
    # A step's values are tensors in the worker (a CUDA tensor would need CUDA on the driver to unpickle);
    # what leaves for the driver's bar is floats, made only for the updates that are sent.
    from types import SimpleNamespace

    import torch

    from launcher.ray.worker import RemoteMetricsSink

    sent: list[Progress] = []
    actor = SimpleNamespace(progress=SimpleNamespace(remote=sent.append))  # records what a Ray actor would get
    sink = RemoteMetricsSink(actor, has_loggers=False, wants_progress=True)
    update = Progress("train", 0, 4, 4, 4, {"loss": torch.tensor(0.25), "acc": 0.5})
    sink.progress(update)
    (received,) = sent
    assert received.metrics == {"loss": 0.25, "acc": 0.5}
    assert all(type(v) is float for v in received.metrics.values())
    assert (received.stage, received.batch_idx, received.total, received.global_step) == ("train", 4, 4, 4)
    assert isinstance(update.metrics["loss"], torch.Tensor)  # the engine's own update is left as it was
