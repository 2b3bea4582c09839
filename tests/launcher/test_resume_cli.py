"""`raylight resume <run dir>`: finish a run whose driver was SIGKILLed; refuse tampered jobs."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from launcher import CSVLogger, Trainer
    from runtime import LightningModule, ModelCheckpoint, seed_everything

    class Slow(LightningModule):
        def __init__(self, delay: float = 0.0):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            time.sleep(self.hparams.delay)
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    root, name, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # 0: in the driver process; N: N Ray Train workers
    address = sys.argv[5] if len(sys.argv) > 5 else None
    seed_everything(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48 * max(1, workers), 4, generator=g)  # 6 steps per epoch on every rank
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    trainer = Trainer(
        max_epochs=3, default_root_dir=root, run_name=name, log_every_n_steps=1, enable_progress_bar=False,
        num_workers=workers, address=address,
        logger=CSVLogger(),
        callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True)],
    )
    model = Slow(delay)
    trainer.fit(model, data)
    torch.save(model.state_dict(), f"{root}/{name}/final.pt")
    """
)


@pytest.fixture
def env(tmp_path):
    env = dict(os.environ, RAYLIGHT_KEY_FILE=str(tmp_path / "key" / "job.key"), PYTHONUNBUFFERED="1")
    return env


def _resume(run_dir, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "resume", str(run_dir)], capture_output=True, text=True, env=env,
        timeout=300,
    )


@pytest.mark.timeout(600)
def test_driver_killed_mid_run_is_finished_by_raylight_resume(tmp_path, env):
    check_driver_kill_and_resume(tmp_path, env, delay=0.15)


def check_driver_kill_and_resume(tmp_path, env, delay: float, ray_args: tuple[str, ...] = ()) -> None:
    """SIGKILL the driver after the step-4 checkpoint, finish with `raylight resume`, compare with a reference run."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    reference = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "reference", "0", *ray_args], capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "killed", str(delay), *ray_args], env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "epoch=0-step=4.ckpt").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "epoch=0-step=4.ckpt").exists(), "the driver died before any checkpoint"
    assert not (run / "final.pt").exists()
    assert '"status": "running"' in (run / "status.json").read_text()
    listed = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ls", str(tmp_path), "--json"], capture_output=True, text=True, env=env
    )
    (row,) = [row for row in json.loads(listed.stdout) if row["run"] == "killed"]
    assert row["status"] == "preempted", "a run whose driver is gone is not shown as running"
    # Its progress is that of the newest committed checkpoint, noted in status.json when it was committed.
    noted_path = run / "checkpoints" / os.path.basename(row["last_checkpoint"])
    assert row["last_checkpoint"] == str(noted_path) and noted_path.exists(), row
    noted = torch.load(noted_path, weights_only=True)
    assert (row["epoch"], row["global_step"]) == (noted["epoch"], noted["global_step"])

    resumed = _resume(run, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished at epoch 3, step 18" in resumed.stdout

    expected = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 18
    for key, value in expected.items():
        assert torch.equal(last["state_dict"][key], value), key
    assert '"status": "finished"' in (run / "status.json").read_text()

    with open(run / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train_loss")]
    assert steps == list(range(18)), "every step is logged exactly once across the kill and the resume"


def _finished_run(tmp_path, env) -> None:
    """A short in-process run at ``tmp_path/run``."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "run", "0"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _payload_writing(marker) -> type:
    """A class whose unpickling runs ``open(marker, "w")``: a harmless stand-in for arbitrary code."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return Payload


def test_resume_refuses_a_tampered_job_without_running_it(tmp_path, env):
    _finished_run(tmp_path, env)
    marker = tmp_path / "payload-ran"
    Payload = _payload_writing(marker)

    (tmp_path / "run" / "job.pkl").write_bytes(pickle.dumps({"job": Payload()}))
    refused = _resume(tmp_path / "run", env)
    assert refused.returncode == 2
    assert "does not match its signature" in refused.stderr and "refusing to unpickle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, "errors are one clear line"
    assert not marker.exists(), "the tampered pickle must never be loaded"

    (tmp_path / "run" / "job.pkl.sig").unlink()
    assert "unsigned" in _resume(tmp_path / "run", env).stderr
    assert not marker.exists()


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, env):
    result = _resume(tmp_path / "nothing-here", env)
    assert result.returncode == 2 and "is not a run directory" in result.stderr


def test_resume_refuses_a_checkpoint_carrying_a_pickle_payload_without_running_it(tmp_path, env):
    _finished_run(tmp_path, env)
    marker = tmp_path / "payload-ran"
    Payload = _payload_writing(marker)

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"] = {"payload": Payload()}
    torch.save(checkpoint, last)
    refused = _resume(tmp_path / "run", env)
    assert refused.returncode == 2
    assert str(last) in refused.stderr and "weights_only" in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("raylight resume: refused to load checkpoint")
    assert not marker.exists(), "the checkpoint's pickle payload must never run"


FAILING_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from launcher import Trainer
    from runtime import LightningModule, ModelCheckpoint, seed_everything

    class FailsAtStep5(LightningModule):
        '''Raises at global_step 5 while the marker file exists (the resumed run trains on).'''

        def __init__(self, marker: str):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            if self.global_step == 5 and os.path.exists(self.hparams.marker):
                raise RuntimeError("the step-5 failure")
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    root, name, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    seed_everything(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    trainer = Trainer(
        max_epochs=3, default_root_dir=root, run_name=name, logger=False, enable_progress_bar=False,
        callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)],  # no last.ckpt
    )
    trainer.fit(FailsAtStep5(marker), data)
    """
)


def test_a_failed_run_without_last_ckpt_resumes_from_its_newest_checkpoint(tmp_path, env):
    script = tmp_path / "train.py"
    script.write_text(FAILING_SCRIPT)
    marker = tmp_path / "fail"
    reference = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "reference", str(marker)], capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    marker.touch()
    failed = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "failed", str(marker)], capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert failed.returncode != 0 and "the step-5 failure" in failed.stderr
    run = tmp_path / "failed"
    status = json.loads((run / "status.json").read_text())
    newest = str(run / "checkpoints" / "epoch=0-step=4.ckpt")
    assert (status["status"], status["global_step"], status["last_checkpoint"]) == ("failed", 5, newest)

    marker.unlink()
    resumed = _resume(run, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from {newest}" in resumed.stderr
    assert "finished at epoch 3, step 18" in resumed.stdout
    expected = torch.load(tmp_path / "reference" / "checkpoints" / "epoch=2-step=18.ckpt", weights_only=True)
    final = torch.load(run / "checkpoints" / "epoch=2-step=18.ckpt", weights_only=True)
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key

    # With status.json lost as well, the newest file in checkpoints/ is where it resumes.
    (run / "status.json").unlink()
    again = _resume(run, env)
    assert again.returncode == 0 and f"from {run / 'checkpoints' / 'epoch=2-step=18.ckpt'}" in again.stderr


def test_resume_refuses_a_run_whose_driver_is_still_running(tmp_path, env):
    _finished_run(tmp_path, env)
    status_file = tmp_path / "run" / "status.json"
    status = json.loads(status_file.read_text())
    # This test's own process stands in for a live driver on this host.
    status.update(status="running", driver={"host": socket.gethostname(), "pid": os.getpid()})
    status_file.write_text(json.dumps(status))
    refused = _resume(tmp_path / "run", env)
    assert refused.returncode == 2
    assert f"pid {os.getpid()}" in refused.stderr and "--force" in refused.stderr, refused.stderr
    assert json.loads(status_file.read_text())["status"] == "running", "nothing ran"

    forced = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "resume", "--force", str(tmp_path / "run")], capture_output=True,
        text=True, env=env, timeout=300,
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads(status_file.read_text())["status"] == "finished"
