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
