"""A worker killed at random points while it writes checkpoints into the driver's directory (20 trials each way).

Each trial runs a Ray task on a fresh worker process that saves checkpoints in a
loop through the same path a training worker uses (``RemoteCheckpointSink``),
both ways it can go: streamed (``torch.save`` into ``CHUNK_BYTES`` chunks sent to the
driver's sink actor, as from another node) and in place (``torch.save`` into a
hidden file in the driver's directory, as from the driver's node), each
committed atomically by the actor. It SIGKILLs the task after a random delay:
inside ``torch.save``, between chunks, or around the commit. After every kill,
the checkpoint a restart would resume from, and every ``*.ckpt`` file in the
driver's directory, must load completely and hold one consistent step; once the
restart begins (``begin_attempt``, as a restarted group's rank 0 calls it), no
hidden half-written file of the killed worker is left in the directory.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from launcher.ray.driver_sink import CHUNK_BYTES, DriverSink
from runtime.checkpoint.io import load_checkpoint

pytestmark = [pytest.mark.slow]

TRIALS = 20
ELEMENTS = (CHUNK_BYTES + CHUNK_BYTES // 2) // 4  # float32s: each file streams in 2 chunks


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((ELEMENTS,), float(step))}, "epoch": 0}


def _save_forever(sink, in_place: bool, ckpt_dir: str, pid_file: str, first_step: int) -> None:
    from launcher.ray.worker import DriverFiles, RemoteCheckpointSink

    files = DriverFiles(sink, in_place=in_place)
    assert files.sees_driver_directory() is in_place  # this task runs on the driver's node
    remote = RemoteCheckpointSink(files)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    step = first_step
    while True:
        checkpoint = _checkpoint(step)
        remote.save(checkpoint, os.path.join(ckpt_dir, f"step={step}.ckpt"))
        remote.save(checkpoint, os.path.join(ckpt_dir, "last.ckpt"))
        step += 1


def _hidden_files(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*"))


def _assert_complete(path: str) -> int:
    checkpoint = load_checkpoint(path)  # raises on a truncated or corrupt file
    step = int(checkpoint["global_step"])
    assert torch.equal(checkpoint["state_dict"]["w"], torch.full((ELEMENTS,), float(step))), path
    return step


@pytest.mark.timeout(900)
@pytest.mark.parametrize("in_place", [False, True], ids=["streamed", "in-place"])
def test_kills_while_saving_checkpoints_never_leave_a_partial_one(in_place, ray_cluster, tmp_path):
    import ray

    from launcher.ray.backend import ensure_ray

    ensure_ray(ray_cluster)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    sink = ray.remote(DriverSink).options(num_cpus=0).remote(str(tmp_path / "run"), [], None, None)
    save = ray.remote(num_cpus=1, max_retries=0)(_save_forever)
    rng = random.Random(0)
    resumed_steps = []
    left_by_kills = []
    try:
        ray.get(sink.begin_attempt.remote(0))  # the first group's rank 0
        next_step = 1
        for trial in range(TRIALS):
            pid_file = tmp_path / f"pid-{trial}"
            ref = save.remote(sink, in_place, str(ckpt_dir), str(pid_file), next_step)
            deadline = time.monotonic() + 120
            while not pid_file.exists() or not pid_file.read_text():
                assert time.monotonic() < deadline, "the saving task never started"
                if ray.wait([ref], timeout=0)[0]:
                    ray.get(ref)  # it failed before saving anything: raise its error
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            with pytest.raises(ray.exceptions.RayError):
                ray.get(ref, timeout=120)
            left_by_kills.append(_hidden_files(tmp_path / "run"))
            ray.get(sink.begin_attempt.remote(0))  # a restarted group's rank 0: the killed worker's files go
            assert _hidden_files(tmp_path / "run") == [], left_by_kills[-1]

            latest = ray.get(sink.latest_checkpoint.remote())
            if latest is None:
                assert not list(ckpt_dir.glob("*.ckpt")) if ckpt_dir.exists() else True
                continue
            step = _assert_complete(latest)  # what a restarted worker would download and resume from
            resumed_steps.append(step)
            for path in ckpt_dir.glob("*.ckpt"):
                _assert_complete(str(path))
            next_step = step + 1
    finally:
        ray.kill(sink, no_restart=True)
    # The kills landed at different points: most trials committed something new, so the resume point moved on.
    assert len(resumed_steps) >= TRIALS // 2, resumed_steps
    assert resumed_steps == sorted(resumed_steps), resumed_steps
    # Some kills landed mid-write and left a hidden file behind, which the restart removed.
    assert any(left_by_kills), left_by_kills
    way = "in place" if in_place else "streamed"
    print(f"\nFAULT checkpoint-kills ({way}): {TRIALS} kills, every resume point complete: {resumed_steps}")
