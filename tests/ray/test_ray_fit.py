"""2-worker Ray runs on CPU (gloo), checked from the driver: weights, metrics, files, resume, predict, errors.

Ray runs are slow to start, so one run serves several tests where it can: ``fitted`` is one fit followed by
validate and test on the same Trainer, ``resumed`` is the four fits of the resume tests.
"""

from __future__ import annotations

import csv
import ctypes
import os
import platform
import re
import threading
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import launcher.ray.job
from launcher import CSVLogger, TensorBoardLogger, Trainer
from launcher.progress import _format_value
from launcher.ray.backend import WorkerError
from launcher.ray.job import UnpicklableJobError
from runtime import BasePredictionWriter, LightningModule, ModelCheckpoint, seed_everything

WORKERS = 2
# 40 samples, 20 per rank: per-rank batches of 8, 8, 4 (3 steps an epoch), so the epoch mean is batch-size weighted.
SAMPLES, BATCH, EPOCHS = 40, 8, 2
RANK_BATCH_SIZES = [8, 8, 4]
STEPS_PER_EPOCH = len(RANK_BATCH_SIZES)
VAL_SAMPLES, VAL_BATCH = 12, 4


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g))


def _rank_value(rank: int, batch_idx: int) -> float:
    return 10.0 * rank + batch_idx


class Regression(LightningModule):
    """Logs rank-dependent values so every reduction gives a different, known number."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        value = torch.tensor(_rank_value(self.global_rank, batch_idx))
        for reduce_fx in ("mean", "sum", "max"):
            self.log(f"epoch_{reduce_fx}", value, sync_dist=True, reduce_fx=reduce_fx, on_step=False, on_epoch=True)
        self.log("epoch_unsynced", value, on_step=False, on_epoch=True)
        self.log("step_mean", value, sync_dist=True, on_step=True, on_epoch=False)
        self.log("step_unsynced", value, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_close_states(actual: dict, expected: dict, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=lambda m: f"{what}, {key}: {m}")


RAY_NOISE = re.compile(r"\(RayTrainWorker|\(TrainController|\(DriverSink|\(pid=|\bINFO\b|ray\.train|raylet")


def _ray_noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if RAY_NOISE.search(line)]


# ============================================================== one fit, then validate and test
def _read_console(request) -> str | None:
    """What reached this process's stdout/stderr (file descriptors included) since the last call.

    A module-scoped fixture cannot use ``capfd``; pytest's own capture sees the same output. None under ``-s``.
    """
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return None
    out, err = capman.read_global_capture()
    return out + err


@pytest.fixture(scope="module")
def fitted(ray_cluster, tmp_path_factory, request):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # as in a fresh script: the Trainer connects to Ray itself
    root = tmp_path_factory.mktemp("fitted")
    train, val = _data(SAMPLES, seed=1), _data(VAL_SAMPLES, seed=2)
    torch.manual_seed(0)
    model = Regression()
    initial = _state(model)
    checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    # The run directory's own TensorBoard files, plus loggers with a save_dir and no version: each picks the
    # next free version once, for fit, validate and test together.
    loggers = [
        TensorBoardLogger(),
        TensorBoardLogger(save_dir=str(root / "logs"), name="tb"),
        CSVLogger(save_dir=str(root / "logs"), name="csv"),
    ]
    trainer = Trainer(
        num_workers=WORKERS, address=ray_cluster, default_root_dir=str(root), run_name="fitted", max_epochs=EPOCHS,
        log_every_n_steps=1, callbacks=[checkpoint], logger=loggers,
    )
    _read_console(request)
    trainer.fit(
        model, DataLoader(train, batch_size=BATCH, shuffle=False), DataLoader(val, batch_size=VAL_BATCH, shuffle=False)
    )
    time.sleep(1)  # anything Ray streams to the driver arrives shortly after the run
    console = _read_console(request)
    after_fit = {
        "weights": _state(model),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "best_model_path": checkpoint.best_model_path,
        "last_model_path": checkpoint.last_model_path,
        "best_k_models": dict(checkpoint.best_k_models),
    }
    # last.ckpt was saved in epoch 1: its weights are the fitted ones, its epoch is not the fitted current_epoch.
    validated = trainer.validate(model, DataLoader(val, batch_size=VAL_BATCH), verbose=False, ckpt_path="last")
    counters = {"validate": (trainer.current_epoch, trainer.global_step)}
    tested = trainer.test(model, DataLoader(val, batch_size=VAL_BATCH), verbose=False)
    counters["test"] = (trainer.current_epoch, trainer.global_step)
    return dict(
        root=root, run_dir=root / "fitted", trainer=trainer, model=model, initial=initial, train=train, val=val,
        after_fit=after_fit, validated=validated, tested=tested, counters=counters, loggers=loggers,
        console=console,
    )


def test_weights_equal_single_process_with_double_batch(fitted, tmp_path):
    model = Regression()
    model.load_state_dict(fitted["initial"])
    trainer = Trainer(
        num_workers=0, default_root_dir=str(tmp_path), run_name="single", max_epochs=EPOCHS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    )
    trainer.fit(
        model,
        DataLoader(fitted["train"], batch_size=WORKERS * BATCH, shuffle=False),
        DataLoader(fitted["val"], batch_size=WORKERS * VAL_BATCH),
    )
    after = fitted["after_fit"]
    assert after["global_step"] == trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    assert after["current_epoch"] == trainer.current_epoch == EPOCHS
    assert not torch.allclose(after["weights"]["net.0.weight"], fitted["initial"]["net.0.weight"]), "nothing trained"
    _assert_close_states(after["weights"], _state(model), atol=1e-4, what="2 Ray workers vs one process")


def _lightning_reductions() -> dict[str, float]:
    """What Lightning reports for the values logged in Regression.training_step (last epoch)."""
    values = [[_rank_value(r, b) for b in range(STEPS_PER_EPOCH)] for r in range(WORKERS)]
    weighted = [sum(v * s for v, s in zip(values[r], RANK_BATCH_SIZES)) for r in range(WORKERS)]
    last = [values[r][-1] for r in range(WORKERS)]
    return {
        # epoch "mean" is weighted by batch size over all ranks' samples; "sum" adds the step values
        "epoch_mean": sum(weighted) / (WORKERS * sum(RANK_BATCH_SIZES)),
        "epoch_sum": sum(sum(v) for v in values),
        "epoch_max": max(max(v) for v in values),
        "epoch_unsynced": weighted[0] / sum(RANK_BATCH_SIZES),  # rank 0's own epoch mean
        "step_mean": sum(last) / WORKERS,  # the last step's values, averaged over ranks
        "step_unsynced": last[0],
    }


def test_sync_dist_reductions_reach_the_driver_as_lightning_defines(fitted):
    metrics = fitted["after_fit"]["callback_metrics"]
    expected = _lightning_reductions()
    # The data make batch-size weighting visible: the weighted mean is not the plain mean of the values.
    values = [_rank_value(r, b) for r in range(WORKERS) for b in range(STEPS_PER_EPOCH)]
    assert expected["epoch_mean"] != pytest.approx(sum(values) / len(values))
    for name, value in expected.items():
        assert name in metrics, sorted(metrics)
        assert metrics[name] == pytest.approx(value, abs=1e-5), name
    assert "val_loss" in metrics


def test_tensorboard_scalars_are_on_the_driver(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = fitted["run_dir"]
    assert os.path.realpath(fitted["trainer"].log_dir) == os.path.realpath(run_dir)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = _lightning_reductions()
    assert set(expected) | {"val_loss"} <= scalars, sorted(scalars)

    steps = EPOCHS * STEPS_PER_EPOCH
    step_mean = events.Scalars("step_mean")
    assert [e.step for e in step_mean] == list(range(steps))
    assert [e.value for e in step_mean] == pytest.approx(
        [sum(_rank_value(r, s % STEPS_PER_EPOCH) for r in range(WORKERS)) / WORKERS for s in range(steps)]
    )
    assert [e.value for e in events.Scalars("step_unsynced")] == pytest.approx(
        [_rank_value(0, s % STEPS_PER_EPOCH) for s in range(steps)]
    )
    # Epoch metrics are logged at the epoch's last step, as Lightning does.
    epoch_ends = [(epoch + 1) * STEPS_PER_EPOCH - 1 for epoch in range(EPOCHS)]
    for name in ("epoch_mean", "epoch_sum", "epoch_max", "epoch_unsynced"):
        logged = events.Scalars(name)
        assert [e.step for e in logged] == epoch_ends, name
        assert [e.value for e in logged] == pytest.approx([expected[name]] * EPOCHS), name
    assert [e.value for e in events.Scalars("val_loss")][-1] == pytest.approx(
        fitted["after_fit"]["callback_metrics"]["val_loss"], abs=1e-6
    )


def test_checkpoints_are_on_the_driver_and_hold_the_final_weights(fitted):
    checkpoint_dir = fitted["run_dir"] / "checkpoints"
    after = fitted["after_fit"]
    names = sorted(os.listdir(checkpoint_dir))
    assert names == sorted(["last.ckpt", "epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]), names
    loaded = {name: torch.load(checkpoint_dir / name, weights_only=True) for name in names}
    assert {name: c["global_step"] for name, c in loaded.items()} == {
        "last.ckpt": 6, "epoch=0-step=3.ckpt": 3, "epoch=1-step=6.ckpt": 6
    }
    for name in ("last.ckpt", "epoch=1-step=6.ckpt"):
        state = loaded[name]["state_dict"]
        assert state.keys() == after["weights"].keys()
        for key, value in after["weights"].items():
            assert torch.equal(state[key], value), (name, key)

    best, last = after["best_model_path"], after["last_model_path"]
    assert last == str(checkpoint_dir / "last.ckpt") and os.path.isfile(last)
    assert os.path.dirname(best) == str(checkpoint_dir) and os.path.isfile(best)
    assert set(after["best_k_models"]) == {str(checkpoint_dir / n) for n in names if n != "last.ckpt"}
    val_losses = {path: float(score) for path, score in after["best_k_models"].items()}
    assert best == min(val_losses, key=val_losses.get)


def test_save_checkpoint_after_a_ray_run_saves_the_weights_and_refuses_a_checkpoint_that_cannot_resume(
    fitted, tmp_path
):
    trainer = fitted["trainer"]
    with pytest.raises(RuntimeError, match=r"optimizer and loop state.*weights_only=True.*last\.ckpt"):
        trainer.save_checkpoint(tmp_path / "full.ckpt")
    assert not (tmp_path / "full.ckpt").exists()
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)["state_dict"]
    for key, value in fitted["after_fit"]["weights"].items():
        assert torch.equal(saved[key], value), key


def test_validate_and_test_after_fit_return_one_dict_per_dataloader(fitted):
    model = fitted["model"]
    x, y = fitted["val"].tensors
    with torch.no_grad():
        expected = F.mse_loss(model.net(x), y).item()  # equal batches on both ranks: the mean over all samples
    validated, tested = fitted["validated"], fitted["tested"]
    assert isinstance(validated, list) and len(validated) == 1 and set(validated[0]) == {"val_loss"}
    assert isinstance(tested, list) and len(tested) == 1 and set(tested[0]) == {"test_loss"}
    assert validated[0]["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert tested[0]["test_loss"] == pytest.approx(expected, abs=1e-5)
    # validate/test do not train: the driver's module still holds the fitted weights
    for key, value in fitted["after_fit"]["weights"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_driver_console_shows_the_final_metrics_and_no_ray_internals(fitted):
    if fitted["console"] is None:
        pytest.skip("reads the console through pytest's output capture, which -s turns off")
    noise = _ray_noise(fitted["console"])
    assert not noise, "Ray's own logs reached the driver's console:\n" + "\n".join(noise[:20])
    # The last training bar shows the last validation's val_loss, not the one its last batch carried.
    frames = [f for f in fitted["console"].replace("\r", "\n").splitlines() if f.startswith(f"Epoch {EPOCHS - 1}")]
    final = _format_value(fitted["after_fit"]["callback_metrics"]["val_loss"])
    assert frames and f"val_loss={final}" in frames[-1], frames[-1:]


def test_evaluate_after_fit_keeps_the_fits_counters_logger_step_and_logger_version(fitted):
    """As one Lightning Trainer: validate(ckpt_path="last") and test() after fit keep the fitted epoch and step,
    log at the fit's last logger step, and a logger with save_dir but no version writes all three stages into
    the one version its log_dir names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = EPOCHS * STEPS_PER_EPOCH
    assert fitted["counters"] == {"validate": (EPOCHS, steps), "test": (EPOCHS, steps)}
    _, tensorboard, csv_logger = fitted["loggers"]
    for logger, name in ((tensorboard, "tb"), (csv_logger, "csv")):
        assert sorted(os.listdir(fitted["root"] / "logs" / name)) == ["version_0"], name
        assert logger.log_dir == str(fitted["root"] / "logs" / name / "version_0"), name
    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("step_mean")] == list(range(steps))
    assert [e.step for e in events.Scalars("test_loss")] == [steps]
    assert [e.step for e in events.Scalars("val_loss")][-1] == steps  # the fit's are earlier; validate()'s last
    assert [e.value for e in events.Scalars("test_loss")] == pytest.approx([fitted["tested"][0]["test_loss"]])
    with open(os.path.join(csv_logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], float(r["test_loss"])) for r in rows if r["test_loss"]] == [
        (str(steps), pytest.approx(fitted["tested"][0]["test_loss"]))
    ]
    assert {r["step"] for r in rows if r["step_mean"]} == {str(s) for s in range(steps)}


# ============================================================== resume
RESUME_SAMPLES, RESUME_BATCH, RESUME_EVERY = 40, 4, 3  # 20 per rank: 5 steps an epoch, step checkpoints at 3, 6, 9
RESUME_STEPS_PER_EPOCH = RESUME_SAMPLES // (WORKERS * RESUME_BATCH)
RESUME_SEED = 7


class DropoutRegression(LightningModule):
    """Dropout and shuffling make every step depend on the generators; ``seen`` records rank 0's samples per step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1))
        self.register_buffer("seen", torch.full((EPOCHS * RESUME_STEPS_PER_EPOCH, RESUME_BATCH), -1))

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        self.seen[self.global_step] = idx
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _resume_data() -> TensorDataset:
    x, y = _data(RESUME_SAMPLES, seed=3).tensors
    return TensorDataset(torch.arange(RESUME_SAMPLES), x, y)


def _resume_fit(ray_cluster, root, run_name: str, max_epochs: int, ckpt_path=None):
    seed_everything(RESUME_SEED, verbose=False)
    model = DropoutRegression()
    trainer = Trainer(
        num_workers=WORKERS, address=ray_cluster, default_root_dir=str(root), run_name=run_name,
        max_epochs=max_epochs, num_sanity_val_steps=0, enable_progress_bar=False, logger=False,
        callbacks=[ModelCheckpoint(every_n_train_steps=RESUME_EVERY, save_top_k=-1, save_last=True)],
    )
    trainer.fit(model, DataLoader(_resume_data(), batch_size=RESUME_BATCH, shuffle=True), ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def resumed(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full, full_trainer = _resume_fit(ray_cluster, root, "uninterrupted", EPOCHS)
    _, first = _resume_fit(ray_cluster, root, "interrupted", 1)
    first_epoch_checkpoints = sorted(os.listdir(root / "interrupted" / "checkpoints"))
    from_last, from_last_trainer = _resume_fit(ray_cluster, root, "interrupted", EPOCHS, ckpt_path="last")
    mid_epoch = root / "interrupted" / "checkpoints" / f"epoch=0-step={RESUME_EVERY}.ckpt"
    from_mid, from_mid_trainer = _resume_fit(ray_cluster, root, "from-mid-epoch", EPOCHS, ckpt_path=str(mid_epoch))
    return dict(
        full=(full, full_trainer), first=first, first_epoch_checkpoints=first_epoch_checkpoints,
        from_last=(from_last, from_last_trainer), from_mid=(from_mid, from_mid_trainer),
    )


def _assert_same_run(resumed_pair, full_pair, what: str) -> None:
    (model, trainer), (full, full_trainer) = resumed_pair, full_pair
    assert trainer.global_step == full_trainer.global_step == EPOCHS * RESUME_STEPS_PER_EPOCH, what
    assert trainer.current_epoch == full_trainer.current_epoch == EPOCHS, what
    expected = _state(full)
    for key, value in _state(model).items():
        assert torch.equal(value, expected[key]), f"{what}: {key} differs"  # on CPU, bit for bit


def test_uninterrupted_run_uses_the_drivers_seed(resumed):
    full, _ = resumed["full"]
    # Every step saw a full batch, and rank 0's samples follow Lightning's DistributedSampler seeded from
    # seed_everything() on the driver (PL_GLOBAL_SEED), epoch by epoch.
    expected = []
    for epoch in range(EPOCHS):
        sampler = DistributedSampler(
            range(RESUME_SAMPLES), num_replicas=WORKERS, rank=0, shuffle=True, seed=RESUME_SEED
        )
        sampler.set_epoch(epoch)
        expected += list(sampler)
    assert full.seen.flatten().tolist() == expected


def test_resume_from_last_equals_uninterrupted(resumed):
    assert resumed["first"].global_step == RESUME_STEPS_PER_EPOCH
    assert "last.ckpt" in resumed["first_epoch_checkpoints"]
    _assert_same_run(resumed["from_last"], resumed["full"], "resumed from last.ckpt after epoch 0")


def test_resume_mid_epoch_equals_uninterrupted(resumed):
    assert f"epoch=0-step={RESUME_EVERY}.ckpt" in resumed["first_epoch_checkpoints"]
    _assert_same_run(resumed["from_mid"], resumed["full"], f"resumed from step {RESUME_EVERY}, mid epoch 0")


def test_one_worker_run_reproduces_the_in_process_run(ray_cluster, tmp_path, monkeypatch):
    # seed_everything() on the driver governs the workers: shuffling and dropout draw from the driver's generators.
    monkeypatch.chdir(tmp_path)  # a relative ModelCheckpoint dirpath means this directory, on Ray too
    states = {}
    for workers in (0, 1):
        seed_everything(RESUME_SEED, verbose=False)
        model = DropoutRegression()
        ray_args = dict(address=ray_cluster) if workers else {}
        trainer = Trainer(
            num_workers=workers, **ray_args, default_root_dir=str(tmp_path), run_name=f"workers-{workers}",
            max_epochs=1, enable_progress_bar=False, logger=False,
            callbacks=[ModelCheckpoint(dirpath=f"relative-{workers}")],
        )
        trainer.fit(model, DataLoader(_resume_data(), batch_size=RESUME_BATCH, shuffle=True))  # 10 steps
        states[workers] = _state(model)
        saved = torch.load(tmp_path / f"relative-{workers}" / "epoch=0-step=10.ckpt", weights_only=True)
        assert all(torch.equal(saved["state_dict"][key], value) for key, value in states[workers].items())
    assert states[1].keys() == states[0].keys()
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


class LargeBlockProbe(LightningModule):
    """Allocates a 24 MiB block in its first step and logs how much of it glibc served with a mapping of its own."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        class MallInfo2(ctypes.Structure):  # made here: a ctypes structure class cannot be pickled into the job
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = MallInfo2
        before = mallinfo2().hblkhd  # bytes in blocks that have their own mapping
        block = bytearray(24 * 2**20)
        self.log("mapped_mib", (mallinfo2().hblkhd - before) / 2**20, on_step=False, on_epoch=True)
        del block
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings (mallinfo2: glibc 2.33+)")
def test_workers_tune_malloc_unless_the_driver_sets_raylight_tune_malloc_0(ray_cluster, tmp_path, monkeypatch):
    # A tuned worker serves blocks up to 32 MiB from its heap (memory a step frees stays for the next step);
    # glibc's own settings map a block that large for itself and unmap it when it is freed. The workers run
    # on the cluster's nodes, which the driver's environment does not reach: its RAYLIGHT_TUNE_MALLOC=0
    # travels with the job.
    monkeypatch.delenv("RAYLIGHT_TUNE_MALLOC", raising=False)
    mapped = {}
    for setting in ("default", "0"):
        if setting == "0":
            monkeypatch.setenv("RAYLIGHT_TUNE_MALLOC", "0")
        trainer = Trainer(
            num_workers=1, address=ray_cluster, default_root_dir=str(tmp_path), run_name=f"malloc-{setting}",
            max_steps=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
        )
        trainer.fit(LargeBlockProbe(), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
        mapped[setting] = float(trainer.callback_metrics["mapped_mib"])
    assert mapped["default"] == 0, f"a worker should serve a 24 MiB block from its heap, MiB mapped: {mapped}"
    assert mapped["0"] >= 24, f"RAYLIGHT_TUNE_MALLOC=0 on the driver should leave glibc's settings, MiB mapped: {mapped}"


# ============================================================== predict
class IndexTimesTwo(LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def predict_step(self, batch, batch_idx):
        idx, x = batch
        return torch.stack([idx.to(x.dtype), self.scale * x[:, 0]], dim=1)


def test_predict_returns_each_sample_once_in_order_and_warns_about_captured_data(ray_cluster, tmp_path, monkeypatch):
    # 11 samples, batch 3: DistributedSampler pads rank 1 with sample 0. Each sample carries 32768 floats, so the
    # job (dataset captured by value) is above the lowered large-job threshold.
    n = 11
    x = torch.randn(n, 32768)
    monkeypatch.setattr(launcher.ray.job, "LARGE_JOB_BYTES", n * x[0].nbytes // 2)
    trainer = Trainer(
        num_workers=WORKERS, address=ray_cluster, default_root_dir=str(tmp_path), run_name="predict",
        enable_progress_bar=False, logger=False,
    )
    with pytest.warns(UserWarning, match=r"serialised job is \d+ MiB") as warned:
        predictions = trainer.predict(IndexTimesTwo(), DataLoader(TensorDataset(torch.arange(n), x), batch_size=3))
    message = " ".join(str(w.message) for w in warned)
    assert "dataset" in message and "setup()" in message and "_dataloader()" in message, message

    got = torch.cat(predictions)
    assert got[:, 0].tolist() == list(range(n))
    torch.testing.assert_close(got[:, 1], 2 * x[:, 0])


class FileWriter(BasePredictionWriter):
    """Each rank writes each batch's predictions, with their dataset indices, to a file of its own."""

    def __init__(self, directory: str):
        super().__init__("batch")
        self.directory = directory

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        name = f"rank{trainer.global_rank}-batch{batch_idx}.pt"
        torch.save({"indices": list(batch_indices), "prediction": prediction}, os.path.join(self.directory, name))


def test_predict_with_a_writer_and_no_returned_predictions_writes_each_sample_on_its_rank(ray_cluster, tmp_path):
    # The workers run on this machine, so they can write into tmp_path; nothing comes back to the driver.
    out = tmp_path / "predictions"
    out.mkdir()
    n = 11
    x = torch.randn(n, 3)
    trainer = Trainer(
        num_workers=WORKERS, address=ray_cluster, default_root_dir=str(tmp_path), run_name="writer",
        enable_progress_bar=False, logger=False, callbacks=[FileWriter(str(out))],
    )
    returned = trainer.predict(
        IndexTimesTwo(), DataLoader(TensorDataset(torch.arange(n), x), batch_size=3), return_predictions=False
    )
    assert returned is None
    written = [torch.load(path, weights_only=True) for path in sorted(out.iterdir())]
    assert {path.name.split("-")[0] for path in out.iterdir()} == {"rank0", "rank1"}
    by_index = {}
    for record in written:
        for index, row in zip(record["indices"], record["prediction"]):
            assert row[0].item() == index, "the indices name the samples the prediction is for"
            by_index[index] = row[1]
    assert sorted(by_index) == list(range(n))  # rank 1's padding repeats sample 0
    torch.testing.assert_close(torch.stack([by_index[i] for i in range(n)]), 2 * x[:, 0])


# ============================================================== errors
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.table_lock = threading.Lock()


class WithLock(LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def training_step(self, batch, batch_idx):
        return self.encoder.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_unpicklable_member_fails_on_the_driver_with_its_attribute_path(ray_cluster, tmp_path):
    trainer = Trainer(
        num_workers=WORKERS, address=ray_cluster, default_root_dir=str(tmp_path), run_name="lock",
        enable_progress_bar=False,
    )
    started = time.monotonic()
    with pytest.raises(UnpicklableJobError) as raised:
        trainer.fit(WithLock(), DataLoader(_data(8, seed=0), batch_size=4))
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"the driver took {elapsed:.1f}s to refuse the job"
    message = str(raised.value)
    assert "model.encoder.table_lock" in message and "lock" in message and "setup()" in message, message
    # Nothing was scheduled: Ray Train never created the run's storage.
    assert not (tmp_path / "lock" / ".ray_train").exists()


FAIL_BATCH = 1


class FailsOnRankOne(Regression):
    def __init__(self, pid_dir: str):
        super().__init__()
        self.pid_dir = pid_dir

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            with open(os.path.join(self.pid_dir, f"rank{self.global_rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        if self.global_rank == 1 and batch_idx == FAIL_BATCH:
            raise ValueError(f"deliberate failure on rank 1 at batch {batch_idx}")
        return super().training_step(batch, batch_idx)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_rank_one_failing_in_training_step_fails_the_run_on_the_driver(ray_cluster, tmp_path):
    trainer = Trainer(
        num_workers=WORKERS, address=ray_cluster, default_root_dir=str(tmp_path), run_name="fails", max_epochs=1,
        enable_progress_bar=False, logger=False,
    )
    started = time.monotonic()
    with pytest.raises(WorkerError) as raised:
        trainer.fit(FailsOnRankOne(str(tmp_path)), DataLoader(_data(SAMPLES, seed=1), batch_size=BATCH))
    elapsed = time.monotonic() - started
    assert elapsed < 120, f"the failed run took {elapsed:.0f}s to reach the driver"
    message = str(raised.value)
    assert "[Rank 1]" in message and "Rank 0" not in message, message
    assert f"[Rank 1]: ValueError: deliberate failure on rank 1 at batch {FAIL_BATCH}" in message, message
    # The traceback points at the user's code on the driver (it was pickled by value), source line included.
    assert f'File "{__file__}"' in message and "in training_step" in message, message
    assert 'raise ValueError(f"deliberate failure on rank 1 at batch {batch_idx}")' in message, message
    assert set(raised.value.failures) == {1}
    # Rank 0 was blocked in the gradient all-reduce of batch 1: its process was torn down, not left waiting.
    pids = {rank: int((tmp_path / f"rank{rank}.pid").read_text()) for rank in range(WORKERS)}
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [rank for rank, pid in pids.items() if _running(pid)], pids
    print(f"\nFAULT rank-1-raises: WorkerError naming rank 1 after {elapsed:.1f} s, no worker left")


class OwnCheckpointRegression(LightningModule):
    """Keeps its best epoch by val_loss through configure_callbacks, in a directory of its own."""

    def __init__(self, dirpath: str):
        super().__init__()
        self.dirpath = dirpath
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def configure_callbacks(self):
        return ModelCheckpoint(dirpath=self.dirpath, monitor="val_loss", save_top_k=1, filename="best-{epoch}")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_configure_callbacks_model_checkpoint_reaches_the_driver(ray_cluster, tmp_path):
    """Its state comes back from the workers into trainer.checkpoint_callback, so ckpt_path="best" finds it."""
    seed_everything(0)
    own = tmp_path / "own"
    trainer = Trainer(
        num_workers=1, address=ray_cluster, default_root_dir=str(tmp_path), run_name="cc", max_epochs=3,
        enable_progress_bar=False, logger=False, num_sanity_val_steps=0,
    )
    model = OwnCheckpointRegression(str(own))
    val = DataLoader(_data(VAL_SAMPLES, seed=1), batch_size=VAL_BATCH)
    trainer.fit(model, DataLoader(_data(SAMPLES, seed=0), batch_size=BATCH), val)

    ckpt = trainer.checkpoint_callback
    assert trainer.checkpoint_callbacks == [ckpt] and ckpt.monitor == "val_loss"
    assert [os.path.basename(p) for p in sorted(own.iterdir())] == [os.path.basename(ckpt.best_model_path)]
    assert ckpt.best_model_path == str(own / os.path.basename(ckpt.best_model_path))
    result = trainer.validate(model, val, ckpt_path="best", verbose=False)
    assert result[0]["val_loss"] == pytest.approx(float(ckpt.best_model_score), abs=1e-6)


class HeadBuiltInSetup(LightningModule):
    """A body from __init__ and a head built in setup(): on Ray only the workers run setup()."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)

    def setup(self, stage):
        if not hasattr(self, "head"):
            self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.body(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_driver_gets_the_weights_in_the_runs_precision_and_is_told_about_layers_it_lacks(ray_cluster, tmp_path):
    seed_everything(0, verbose=False)
    model = HeadBuiltInSetup()
    trainer = Trainer(num_workers=1, address=ray_cluster, default_root_dir=str(tmp_path), run_name="setup-head",
                      max_epochs=1, precision="64-true", enable_progress_bar=False, logger=False)
    with pytest.warns(UserWarning, match=r"head\.weight, head\.bias.*built in setup\(\)"):
        trainer.fit(model, DataLoader(_data(SAMPLES, seed=0), batch_size=BATCH))
    last = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)["state_dict"]
    assert model.body.weight.dtype == torch.float64  # as in-process: 64-true converts the module
    assert torch.equal(model.body.weight, last["body.weight"]) and last["head.weight"].dtype == torch.float64
