"""Driver-side loggers: files a user would open (event files, metrics.csv, hparams.json)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import time

import cloudpickle
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.loggers import CSVLogger, TensorBoardLogger
from runtime.sinks import MetricsSink, Progress


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _next_second() -> None:
    """Wait for the wall clock's next second.

    Event file names start with the creation time in whole seconds and
    TensorBoard reads files in name order; a resumed run's file must sort
    after the interrupted run's, as it does when they are not seconds apart.
    """
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _csv_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_loggers_are_metrics_sinks(cls):
    assert isinstance(cls(), MetricsSink)


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_scalars_read_back_with_steps_and_values(tmp_path):
    run_dir = tmp_path / "run-1"
    logger = TensorBoardLogger()
    logger.attach(str(run_dir))
    assert logger.log_dir == str(run_dir)

    logger.log_metrics({"train_loss": 0.5, "epoch": 0.0}, step=0)
    logger.log_metrics({"train_loss": 0.25}, step=10)
    logger.log_metrics({"val_loss": 0.75, "epoch": 1.0}, step=20)
    logger.progress(Progress("train", 0, 1, 10, 1))  # a no-op, must not fail
    logger.finalize("finished")

    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    scalars = _scalars(str(run_dir))
    assert scalars["train_loss"] == [(0, 0.5), (10, 0.25)]
    assert scalars["val_loss"] == [(20, 0.75)]
    assert scalars["epoch"] == [(0, 0.0), (20, 1.0)]


def test_tensorboard_metrics_visible_before_finalize(tmp_path):
    logger = TensorBoardLogger()
    logger.attach(str(tmp_path))
    logger.log_metrics({"loss": 2.0}, step=3)
    # log_metrics flushes: a reader sees the row while the run goes on.
    assert _scalars(str(tmp_path))["loss"] == [(3, 2.0)]
    logger.finalize("finished")


def test_tensorboard_hyperparams(tmp_path):
    logger = TensorBoardLogger()
    logger.attach(str(tmp_path))
    logger.log_hyperparams({"lr": 0.01, "layers": 3, "opt": {"name": "adam"}, "obj": object()})
    logger.finalize("finished")

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "hparams/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "|lr|0.01|" in text and "|layers|3|" in text and "|opt/name|adam|" in text
    assert "object object at" in text  # non-scalar values become str

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == pytest.approx(0.01)
    assert hp["opt/name"].string_value == "adam"


def test_tensorboard_prefix(tmp_path):
    logger = TensorBoardLogger(prefix="fold1")
    logger.attach(str(tmp_path))
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("finished")
    assert list(_scalars(str(tmp_path))) == ["fold1-loss"]


def test_tensorboard_resume_purges_steps_logged_after_the_checkpoint(tmp_path):
    first = TensorBoardLogger()
    first.attach(str(tmp_path))
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("interrupted")

    _next_second()
    resumed = TensorBoardLogger()
    resumed.attach(str(tmp_path), resume_step=4)
    resumed.log_metrics({"loss": 40.0}, step=4)
    resumed.log_metrics({"loss": 50.0}, step=5)
    resumed.finalize("finished")

    assert _scalars(str(tmp_path))["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]

    # test() after the resumed fit: same directory, nothing purged again.
    _next_second()
    resumed.attach(str(tmp_path))
    resumed.log_metrics({"test_loss": 1.0}, step=6)
    resumed.finalize("finished")
    scalars = _scalars(str(tmp_path))
    assert [s for s, _ in scalars["loss"]] == [0, 1, 2, 3, 4, 5] and scalars["test_loss"] == [(6, 1.0)]


# ------------------------------------------------------------------ CSV


def test_csv_widens_header_when_new_keys_appear(tmp_path):
    logger = CSVLogger(flush_logs_every_n_steps=2)
    logger.attach(str(tmp_path))
    logger.log_metrics({"train_loss": 1.5}, step=0)
    logger.log_metrics({"train_loss": 1.25}, step=1)  # flushed here (2 rows)
    path = tmp_path / "metrics.csv"
    header, rows = _csv_rows(str(path))
    assert header == ["step", "train_loss"]
    assert [r["train_loss"] for r in rows] == ["1.5", "1.25"]

    logger.log_metrics({"val_loss": 0.5, "epoch": 0}, step=1)
    logger.log_metrics({"train_loss": 1.0}, step=2)  # flush with new keys: whole file rewritten
    logger.log_metrics({"train_loss": 0.75}, step=3)
    logger.finalize("finished")

    header, rows = _csv_rows(str(path))
    assert header == ["epoch", "step", "train_loss", "val_loss"]
    assert rows == [
        {"epoch": "", "step": "0", "train_loss": "1.5", "val_loss": ""},
        {"epoch": "", "step": "1", "train_loss": "1.25", "val_loss": ""},
        {"epoch": "0", "step": "1", "train_loss": "", "val_loss": "0.5"},
        {"epoch": "", "step": "2", "train_loss": "1.0", "val_loss": ""},
        {"epoch": "", "step": "3", "train_loss": "0.75", "val_loss": ""},
    ]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_csv_buffers_until_flush_or_finalize(tmp_path):
    logger = CSVLogger()  # flushes every 100 rows by default
    logger.attach(str(tmp_path))
    logger.log_metrics({"a": 1.0}, step=0)
    assert not (tmp_path / "metrics.csv").exists()
    logger.finalize("finished")
    assert _csv_rows(str(tmp_path / "metrics.csv"))[1] == [{"a": "1.0", "step": "0"}]


def test_csv_hparams_json(tmp_path):
    logger = CSVLogger()
    logger.attach(str(tmp_path))
    logger.log_hyperparams({"lr": 0.1, "sizes": (1, 2), "opt": {"name": "sgd"}, "obj": object()})
    data = json.loads((tmp_path / "hparams.json").read_text())
    assert data["lr"] == 0.1 and data["sizes"] == [1, 2] and data["opt"] == {"name": "sgd"}
    assert data["obj"].startswith("<object object at")


def test_csv_resume_drops_rows_from_resume_step_and_keeps_earlier_ones(tmp_path):
    first = CSVLogger(flush_logs_every_n_steps=1)
    first.attach(str(tmp_path))
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("interrupted")

    resumed = CSVLogger(flush_logs_every_n_steps=1)
    resumed.attach(str(tmp_path), resume_step=3)
    resumed.log_metrics({"loss": 30.0}, step=3)
    resumed.log_metrics({"loss": 40.0, "acc": 0.5}, step=4)
    resumed.finalize("finished")
    header, rows = _csv_rows(str(tmp_path / "metrics.csv"))
    assert header == ["acc", "loss", "step"]
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "2.0", ""),
        ("3", "30.0", ""),
        ("4", "40.0", "0.5"),
    ]


@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_reattach_to_same_run_dir_continues_the_same_files(cls, tmp_path):
    # trainer.fit() then trainer.test() with one logger: both land in one record.
    logger = cls()
    logger.attach(str(tmp_path))
    logger.log_metrics({"train_loss": 1.0}, step=0)
    logger.finalize("finished")
    logger.attach(str(tmp_path))
    logger.log_metrics({"test_acc": 0.5}, step=1)
    logger.finalize("finished")
    if cls is CSVLogger:
        header, rows = _csv_rows(str(tmp_path / "metrics.csv"))
        assert header == ["step", "test_acc", "train_loss"]
        assert rows == [
            {"step": "0", "test_acc": "", "train_loss": "1.0"},
            {"step": "1", "test_acc": "0.5", "train_loss": ""},
        ]
    else:
        scalars = _scalars(str(tmp_path))
        assert scalars == {"train_loss": [(0, 1.0)], "test_acc": [(1, 0.5)]}


def test_csv_rows_logged_before_reattach_go_to_the_old_directory(tmp_path):
    logger = CSVLogger()
    logger.attach(str(tmp_path / "a"))
    logger.log_metrics({"x": 1.0}, step=0)
    logger.attach(str(tmp_path / "b"))
    logger.log_metrics({"x": 2.0}, step=1)
    logger.finalize("finished")
    assert _csv_rows(str(tmp_path / "a" / "metrics.csv"))[1] == [{"step": "0", "x": "1.0"}]
    assert _csv_rows(str(tmp_path / "b" / "metrics.csv"))[1] == [{"step": "1", "x": "2.0"}]


# ------------------------------------------------------------------ layout and pickling


@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_log_dir_needs_attach_without_save_dir(cls):
    logger = cls()
    with pytest.raises(RuntimeError, match="attach"):
        _ = logger.log_dir


@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_log_dir_layout(cls, tmp_path):
    run_dir = str(tmp_path / "runs" / "run-a")
    plain = cls()
    plain.attach(run_dir)
    assert plain.log_dir == run_dir

    named = cls(name="csv", version=2)
    named.attach(run_dir)
    assert named.log_dir == os.path.join(run_dir, "csv", "version_2")

    save_dir = tmp_path / "logs"
    first = cls(save_dir=str(save_dir), name="exp")
    first.attach(run_dir)  # save_dir wins over the run directory
    assert first.log_dir == os.path.join(str(save_dir), "exp", "version_0")
    os.makedirs(first.log_dir)
    second = cls(save_dir=save_dir, name="exp")
    assert second.log_dir == os.path.join(str(save_dir), "exp", "version_1")
    assert second.version == 1
    assert cls(save_dir=str(save_dir), version="final").log_dir == os.path.join(str(save_dir), "lightning_logs", "final")
    assert cls(save_dir=str(save_dir), name="", version="final").log_dir == os.path.join(str(save_dir), "final")


@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_save_dir_name_version_and_root_dir_as_in_lightning(cls, tmp_path):
    save_dir = str(tmp_path / "logs")
    logger = cls(save_dir)
    assert (logger.save_dir, logger.name) == (save_dir, "lightning_logs")
    assert logger.root_dir == os.path.join(save_dir, "lightning_logs")
    assert logger.version == 0 and logger.log_dir == os.path.join(save_dir, "lightning_logs", "version_0")
    os.makedirs(logger.log_dir)
    assert cls(save_dir).log_dir == os.path.join(save_dir, "lightning_logs", "version_1")
    for no_name in ("", None):
        unnamed = cls(save_dir, name=no_name)
        assert unnamed.name == "" and unnamed.root_dir == save_dir
        assert unnamed.log_dir == os.path.join(save_dir, "version_0")

    # Without a save_dir the run directory is the run's own directory: the default name adds nothing below it.
    in_run = cls()
    in_run.attach(str(tmp_path / "run"))
    assert in_run.name == "lightning_logs" and in_run.root_dir == in_run.log_dir == str(tmp_path / "run")


def test_tensorboard_sub_dir_is_below_the_version(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="exp", version=3, sub_dir="fold1")
    assert logger.sub_dir == "fold1"
    assert logger.root_dir == str(tmp_path / "exp")
    assert logger.log_dir == str(tmp_path / "exp" / "version_3" / "fold1")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("finished")
    assert _scalars(str(tmp_path / "exp" / "version_3" / "fold1")) == {"loss": [(0, 1.0)]}


def _hparams_tab(log_dir: str):
    """What TensorBoard's HPARAMS tab reads: (hyperparameter names, metric tags), or None when nothing was written."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(log_dir)
    acc.Reload()
    try:
        content = acc.PluginTagToContent("hparams")
    except KeyError:
        return None
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return [h.name for h in experiment.hparam_infos], [m.name.tag for m in experiment.metric_infos]


def test_tensorboard_default_hp_metric_as_in_lightning(tmp_path):
    # True (the default): hp_metric = -1 at step 0, the HPARAMS tab's metric, for self.log("hp_metric", ...).
    default = TensorBoardLogger(str(tmp_path), name="default", prefix="fold1")
    default.log_hyperparams({"lr": 0.1})
    default.finalize("finished")
    assert _scalars(default.log_dir) == {"fold1-hp_metric": [(0, -1.0)]}
    assert _hparams_tab(default.log_dir) == (["lr"], ["fold1-hp_metric"])

    # False: no hp_metric, and no HPARAMS tab until hyperparameters are logged with metrics of the script's own.
    off = TensorBoardLogger(str(tmp_path), name="off", default_hp_metric=False)
    off.log_hyperparams({"lr": 0.1})
    off.flush()
    assert _scalars(off.log_dir) == {} and _hparams_tab(off.log_dir) is None
    off.log_hyperparams({"lr": 0.1}, {"hp/val_acc": 0.5, "hp/val_loss": 0.25})
    off.finalize("finished")
    assert _scalars(off.log_dir) == {"hp/val_acc": [(0, 0.5)], "hp/val_loss": [(0, 0.25)]}
    assert _hparams_tab(off.log_dir) == (["lr"], ["hp/val_acc", "hp/val_loss"])


@pytest.mark.parametrize("prefix", ["", "fold1"])
def test_csv_writes_the_epoch_as_an_integer_as_lightning_does(prefix, tmp_path):
    logger = CSVLogger(str(tmp_path), prefix=prefix)
    logger.log_metrics({"val_loss": 0.5, "epoch": 1.0}, step=3)
    logger.log_metrics({"acc": 1.0}, step=4)
    logger.finalize("finished")
    epoch = f"{prefix}-epoch" if prefix else "epoch"
    rows = _csv_rows(logger.metrics_file_path)[1]
    assert [(r[epoch], r["step"]) for r in rows] == [("1", "3"), ("", "4")]
    assert rows[1][f"{prefix}-acc" if prefix else "acc"] == "1.0"  # a metric stays a float


@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_copies_shipped_for_each_run_write_into_the_loggers_one_version(cls, tmp_path):
    """On Ray, fit and test each send a copy of the logger to the driver's sink actor; with save_dir and no
    version, all copies write into the version the driver's logger reports (the first free one), as one
    Lightning logger keeps one version for its whole life."""
    save_dir = tmp_path / "logs"
    os.makedirs(save_dir / "exp" / "version_0")  # an earlier experiment's
    logger = cls(save_dir=str(save_dir), name="exp")
    for step, stage in enumerate(["fit", "test"]):
        copy = pickle.loads(cloudpickle.dumps(logger))
        copy.attach(str(tmp_path / "run"))
        copy.log_metrics({f"{stage}_loss": 1.0}, step=step)
        copy.finalize("finished")
    assert logger.log_dir == os.path.join(str(save_dir), "exp", "version_1")
    assert sorted(os.listdir(save_dir / "exp")) == ["version_0", "version_1"]
    if cls is TensorBoardLogger:
        assert _scalars(logger.log_dir) == {"fit_loss": [(0, 1.0)], "test_loss": [(1, 1.0)]}
    else:
        rows = _csv_rows(os.path.join(logger.log_dir, "metrics.csv"))[1]
        assert [(r["step"], r["fit_loss"], r["test_loss"]) for r in rows] == [("0", "1.0", ""), ("1", "", "1.0")]


@pytest.mark.parametrize("bad", [{"version": -1}, {"version": True}, {"name": 3}])
def test_bad_constructor_arguments_are_named(bad):
    with pytest.raises((TypeError, ValueError), match=list(bad)[0]):
        TensorBoardLogger(**bad)


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
@pytest.mark.parametrize("cls", [TensorBoardLogger, CSVLogger])
def test_picklable_before_and_after_attach(cls, dumps, tmp_path):
    logger = pickle.loads(dumps(cls(name="n")))
    logger.attach(str(tmp_path))
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.flush()
    copy = pickle.loads(dumps(logger))  # an open event writer is dropped; the directory is kept
    assert copy.log_dir == logger.log_dir == os.path.join(str(tmp_path), "n")
    logger.finalize("finished")
    copy.log_metrics({"loss": 2.0}, step=1)
    copy.finalize("finished")
    if cls is TensorBoardLogger:
        # Two event files in one second: TensorBoard orders them by name, not by write time.
        assert sorted(_scalars(logger.log_dir)["loss"]) == [(0, 1.0), (1, 2.0)]
    else:
        rows = _csv_rows(os.path.join(logger.log_dir, "metrics.csv"))[1]
        assert rows == [{"loss": "1.0", "step": "0"}, {"loss": "2.0", "step": "1"}]


def test_csv_log_metrics_before_attach_fails_at_once():
    with pytest.raises(RuntimeError, match="attach"):
        CSVLogger().log_metrics({"loss": 1.0}, step=0)
