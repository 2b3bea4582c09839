"""Ctrl-C on the driver of a Ray run: the workers stop, the driver raises KeyboardInterrupt, the run is 'interrupted'."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from launcher import CSVLogger, Trainer
    from runtime import LightningModule, ModelCheckpoint

    root, address, shared = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    class Slow(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            (shared / f"pid-{self.global_rank}").write_text(str(os.getpid()))
            (shared / "steps").open("a").write(f"{self.global_step}\\n")
            time.sleep(0.5)
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(400, 4), torch.randn(400, 1)), batch_size=2)
    trainer = Trainer(max_epochs=1, num_workers=2, address=address, default_root_dir=root, run_name="interrupted",
                      enable_progress_bar=False, logger=CSVLogger(), log_every_n_steps=1,
                      callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)])
    try:
        trainer.fit(Slow(), data)
    except KeyboardInterrupt:
        print("caught KeyboardInterrupt", flush=True)
        # Stay alive (as a notebook would) until the test has looked at the workers.
        deadline = time.time() + 120
        while not (shared / "release").exists() and time.time() < deadline:
            time.sleep(0.2)
        sys.exit(130)
    print("fit returned", flush=True)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it runs nothing.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_ctrl_c_on_the_driver_stops_the_workers_and_marks_the_run_interrupted(ray_cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    driver = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "runs"), ray_cluster, str(shared)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 180
        while not ((shared / "steps").exists() and len((shared / "steps").read_text().split()) >= 12):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.5)
        worker_pids = [int((shared / f"pid-{rank}").read_text()) for rank in (0, 1)]

        interrupted_at = time.time()
        driver.send_signal(signal.SIGINT)
        # The driver process lives on after catching KeyboardInterrupt: the workers must stop anyway.
        deadline = time.time() + 60
        while any(_alive(pid) for pid in worker_pids) and time.time() < deadline:
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            time.sleep(0.5)
        stopped_after = time.time() - interrupted_at
        workers_left = [pid for pid in worker_pids if _alive(pid)]
        driver_alive = driver.poll() is None
        (shared / "release").touch()
        out, err = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    assert not workers_left and driver_alive, "Ray Train workers kept running while the driver lived on after Ctrl-C"
    assert stopped_after < 40, f"the workers took {stopped_after:.0f} s to stop"
    print(f"\nFAULT ctrl-c: workers gone {stopped_after:.1f} s after SIGINT, driver alive, status interrupted")
    assert driver.returncode == 130, f"exit code {driver.returncode}\n{out}\n{err[-3000:]}"
    assert "caught KeyboardInterrupt" in out
    run = tmp_path / "runs" / "interrupted"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted"
    # The newest committed checkpoint stays recorded (`raylight resume` continues from it), with its progress,
    # although the workers never sent their state back.
    assert status["global_step"] >= 2 and status["global_step"] % 2 == 0, status
    assert status["last_checkpoint"] == str(run / "checkpoints" / f"epoch=0-step={status['global_step']}.ckpt")
    assert os.path.exists(status["last_checkpoint"])
    # The rows logged up to the interruption are in metrics.csv, not only those flushed with the last checkpoint
    # (which end at the row before the checkpoint's step).
    with open(run / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train_loss")]
    assert steps == list(range(len(steps))) and steps[-1] >= status["global_step"] - 1, (steps, status)
    steps_at_stop = len((shared / "steps").read_text().split())
    time.sleep(2)
    assert len((shared / "steps").read_text().split()) == steps_at_stop, "training went on after Ctrl-C"
    assert steps_at_stop < 200, "the run finished instead of stopping"
