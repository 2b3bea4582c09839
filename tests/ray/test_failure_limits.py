"""Faults with no happy ending on a real Ray cluster: they must end, clearly and in bounded time.

- every attempt fails: exactly ``max_failures + 1`` attempts, then the error;
- a rank stuck inside a step: the others give up after ``collective_timeout_s`` and nothing keeps running;
- more workers than the cluster can ever place: a resource error within ``resource_wait_s``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from launcher.ray.backend import ResourceError, WorkerError
from runtime import LightningModule

pytestmark = [pytest.mark.slow]


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)), batch_size=4)


class Broken(LightningModule):
    """Records each attempt's start and its process id; rank 1 fails (``raise_at``) or hangs (``hang_at``) at a step."""

    def __init__(self, shared: str, raise_at: int | None = None, hang_at: int | None = None):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.shared, self.raise_at, self.hang_at = shared, raise_at, hang_at
        self._started = False

    def training_step(self, batch, batch_idx):
        shared = Path(self.shared)
        if not self._started:
            self._started = True
            (shared / f"attempt-{self.global_rank}-{uuid.uuid4().hex}").write_text(str(os.getpid()))
        if self.global_rank == 1 and batch_idx == self.raise_at:
            raise RuntimeError(f"rank 1 always fails at batch {batch_idx}")
        if self.global_rank == 1 and batch_idx == self.hang_at:
            (shared / "hanging").write_text(str(time.time()))
            time.sleep(3600)
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _attempt_pids(shared: Path) -> list[int]:
    return [int(p.read_text()) for p in shared.glob("attempt-*")]


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_all_gone(pids: list[int], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in pids if _running(pid)], f"worker processes left running: {pids}"


def _trainer(tmp_path: Path, address: str, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=1, num_workers=2, address=address, default_root_dir=str(tmp_path), enable_progress_bar=False,
        logger=False, enable_checkpointing=False, **kwargs,
    )


@pytest.mark.timeout(600)
def test_every_attempt_failing_makes_exactly_max_failures_plus_one_attempts(ray_cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    trainer = _trainer(tmp_path, ray_cluster, max_failures=2)
    started = time.monotonic()
    with pytest.raises(WorkerError) as raised:
        trainer.fit(Broken(str(shared), raise_at=1), _data())
    print(f"\nFAULT every-attempt-fails: 3 attempts, error after {time.monotonic() - started:.1f} s")
    assert "[Rank 1]: RuntimeError: rank 1 always fails at batch 1" in str(raised.value)
    for rank in (0, 1):
        assert len(list(shared.glob(f"attempt-{rank}-*"))) == 3, f"rank {rank}: {sorted(os.listdir(shared))}"
    assert (tmp_path / trainer.run_dir.name / "status.json").exists()
    assert '"failed"' in (tmp_path / trainer.run_dir.name / "status.json").read_text()
    _assert_all_gone(_attempt_pids(shared))


@pytest.mark.timeout(600)
def test_rank_stuck_in_a_step_fails_the_run_after_the_collective_timeout(ray_cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    timeout_s = 10
    trainer = _trainer(tmp_path, ray_cluster, max_failures=0, collective_timeout_s=timeout_s)
    with pytest.raises(WorkerError) as raised:
        trainer.fit(Broken(str(shared), hang_at=2), _data())
    failed_at = time.time()
    stuck_for = failed_at - float((shared / "hanging").read_text())
    # The other rank waited timeout_s in the gradient all-reduce, then its error reached the driver.
    assert timeout_s <= stuck_for < timeout_s + 30, f"the run failed {stuck_for:.1f} s after rank 1 got stuck"
    print(f"\nFAULT stuck-rank: failed {stuck_for:.1f} s after the rank got stuck (collective_timeout_s={timeout_s})")
    message = str(raised.value)
    assert "[Rank 0]" in message and "timed out" in message.lower(), message[-3000:]
    _assert_all_gone(_attempt_pids(shared))  # the sleeping rank too


def test_more_workers_than_the_cluster_can_place_is_a_clear_error_in_bounded_time(ray_cluster, tmp_path):
    trainer = _trainer(tmp_path, ray_cluster, resources_per_worker={"CPU": 3}, resource_wait_s=3)
    started = time.monotonic()
    with pytest.raises(ResourceError) as raised:
        trainer.fit(Broken(str(tmp_path)), _data())
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.0f} s to give up"
    print(f"\nFAULT too-many-workers: ResourceError after {elapsed:.1f} s (resource_wait_s=3)")
    message = str(raised.value)
    assert "num_workers=2" in message and "'CPU': 3.0" in message and "CPU=4" in message and "room for 1" in message
    assert "resource_wait_s" in message and "Lower num_workers or resources_per_worker" in message
