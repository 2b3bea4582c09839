"""Faults on a real Ray cluster: a SIGKILLed worker, a node without the driver's files, a preempted node.

Every faulted run is compared with one undisturbed 2-worker run of the same
model, data and seed: the weights must be equal and the CSV rows (step, loss)
the same, so a restart that resumes anywhere but exactly where the run stopped
shows up as a difference a user would see.

The model records what happened on the workers into a directory outside the
run directory (both nodes see it; only the run directory is hidden from the
extra node): one line per training step from rank 0, and each rank's node and
whether it could see the driver's files, per attempt. An attempt is a fresh
copy of the module on a worker, counted by the marker files it leaves.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import CSVLogger, TensorBoardLogger, Trainer
from runtime import LightningModule, ModelCheckpoint, seed_everything
from tests.ray.conftest import RAY, _ray, _stop_session

STEPS_PER_EPOCH = 24  # per rank: 96 samples / 2 ranks / batch 2
MAX_EPOCHS = 2
TOTAL_STEPS = STEPS_PER_EPOCH * MAX_EPOCHS
DRAIN_DEADLINE_S = 20
HOLD_LIMIT_S = 240  # a held first attempt gives up after this, so a missing restart fails instead of hanging

pytestmark = [pytest.mark.slow]


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2 * 2 * STEPS_PER_EPOCH, 4, generator=g)
    y = (x @ torch.tensor([[0.5], [-1.0], [2.0], [0.25]])).tanh() + 0.1 * torch.randn(len(x), 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)


class Probe(LightningModule):
    """A small MLP (SGD with momentum, so resume needs the optimizer state) that can record, die, slow down and hold.

    shared: directory for the records (None: record nothing, the undisturbed run).
    kill_rank / kill_at: SIGKILL this rank's process in training_step at this global_step, first attempt only.
    slow_s: sleep this long per step on the first attempt (so a drain lands mid-run).
    hold_after_save: on the first attempt, stop making progress once a checkpoint was saved after the
        test wrote ``drained`` (the just-in-time one), until Ray Train tears the attempt down.
    driver_only: a file only the driver's node can see; each rank records whether it sees it.
    """

    def __init__(self, shared=None, kill_rank=None, kill_at=None, slow_s=0.0, hold_after_save=False, driver_only=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.shared = shared
        self.kill_rank, self.kill_at = kill_rank, kill_at
        self.slow_s = slow_s
        self.hold_after_save = hold_after_save
        self.driver_only = driver_only
        self._attempt = None  # set on first use in each worker's own copy of the module

    def attempt(self) -> int:
        if self._attempt is None:
            shared = Path(self.shared)
            (shared / f"start-{self.global_rank}-{uuid.uuid4().hex}").touch()
            self._attempt = len(list(shared.glob(f"start-{self.global_rank}-*")))
            import ray

            record = {
                "node": ray.get_runtime_context().get_node_id(),
                "sees_driver_files": self.driver_only is not None and os.path.exists(self.driver_only),
            }
            (shared / f"node-{self.global_rank}-{self._attempt}.json").write_text(json.dumps(record))
        return self._attempt

    def training_step(self, batch, batch_idx):
        if self.shared is not None:
            self._before_step()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def _before_step(self) -> None:
        shared, rank, step, attempt = Path(self.shared), self.global_rank, self.global_step, self.attempt()
        if rank == 0:
            with open(shared / "steps-0", "a") as f:
                f.write(f"{attempt} {step}\n")
        if attempt != 1:
            return
        if rank == self.kill_rank and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hold_after_save and (shared / f"saved-{rank}").exists():
            deadline = time.time() + HOLD_LIMIT_S
            while time.time() < deadline:
                time.sleep(0.5)
        time.sleep(self.slow_s)

    def on_save_checkpoint(self, checkpoint) -> None:
        if self.shared is not None and self.attempt() == 1 and (Path(self.shared) / "drained").exists():
            (Path(self.shared) / f"saved-{self.global_rank}").write_text(str(checkpoint["global_step"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


# ------------------------------------------------------------------ helpers
def _trainer(root: Path, run_name: str, address: str, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=MAX_EPOCHS,
        num_workers=2,
        address=address,
        default_root_dir=str(root),
        run_name=run_name,
        log_every_n_steps=1,
        enable_progress_bar=False,
        **kwargs,
    )


def _csv_rows(path: str) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(float(r["step"])), float(r["train_loss"])) for r in csv.DictReader(f) if r.get("train_loss")]


def _steps_by_attempt(shared: Path) -> dict[int, list[int]]:
    """global_step of every training_step call on rank 0, per attempt, in call order."""
    out: dict[int, list[int]] = {}
    path = shared / "steps-0"
    if path.exists():
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):  # rank 0 may be writing the last line right now
                attempt, step = (int(v) for v in line.split())
                out.setdefault(attempt, []).append(step)
    return out


def _nodes(shared: Path, attempt: int) -> dict[int, dict]:
    """rank -> {"node", "sees_driver_files"} recorded by the given attempt."""
    found = {}
    for path in shared.glob(f"node-*-{attempt}.json"):
        found[int(path.name.split("-")[1])] = json.loads(path.read_text())
    return found


def _wait_for(predicate, timeout: float, what: str, thread: threading.Thread | None = None, outcome=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if thread is not None and not thread.is_alive():
            pytest.fail(f"the run ended before {what}: {outcome}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _assert_same_weights(model: Probe, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs from the undisturbed run: {got[name]} vs {value}"


def _connect(address: str) -> str:
    """Join the cluster from this (driver) process before extra nodes exist; returns the driver's node id."""
    import ray

    from launcher.ray.backend import ensure_ray

    ensure_ray(address)
    return ray.get_runtime_context().get_node_id()


class _Node:
    def __init__(self, node_id: str, proc: subprocess.Popen):
        self.id, self.proc = node_id, proc

    def kill(self) -> None:
        """The whole node goes at once, as a reclaimed machine does: SIGKILL to every process of its session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _extra_node(address: str, log: Path, cpus: int, hide: list[str]):
    """Like conftest's add_node, but the test holds the node's process so it can kill the node mid-run."""
    import ray

    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    mounts = "".join(f"mount -t tmpfs tmpfs {p} && " for p in hide)
    cmd = (
        f"{mounts}exec {RAY} start --address={address} --node-ip-address=127.0.0.1 --num-cpus={cpus} "
        "--resources='{}' --disable-usage-stats --block"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    node_id = None
    try:
        deadline = time.time() + 90
        while node_id is None:
            new = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
            if new:
                node_id = new.pop()
            elif proc.poll() is not None:
                raise RuntimeError(f"extra Ray node exited: {log.read_text()[-2000:]}")
            elif time.time() > deadline:
                raise TimeoutError(f"extra Ray node did not join within 90 s: {log.read_text()[-2000:]}")
            else:
                time.sleep(0.5)
        yield _Node(node_id, proc)
    finally:
        _stop_session(proc)
        deadline = time.time() + 60
        while node_id and time.time() < deadline and any(
            n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()
        ):
            time.sleep(1)


def _save_a_checkpoint(sink, path: str, step: int) -> str:
    """Save a checkpoint into the driver's directory as rank 0 does; returns which way it went."""
    from launcher.ray.worker import DriverFiles, RemoteCheckpointSink

    files = DriverFiles(sink)
    state = {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((1000,), float(step))}}
    RemoteCheckpointSink(files).save(state, path)
    files.confirm()  # the actor commits while training goes on; a worker's stage ends with this wait
    return "in place" if files.sees_driver_directory() else "streamed"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def undisturbed(ray_cluster, tmp_path_factory):
    """Weights and CSV rows of the same 2-worker run with nothing going wrong."""
    root = tmp_path_factory.mktemp("undisturbed")
    seed_everything(0)
    model = Probe()
    trainer = _trainer(root, "undisturbed", ray_cluster, logger=CSVLogger())
    trainer.fit(model, _loader())
    assert trainer.global_step == TOTAL_STEPS
    rows = _csv_rows(trainer.logger.metrics_file_path)
    assert [s for s, _ in rows] == list(range(TOTAL_STEPS))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, rows


# --------------------------------------------------------------------- tests
@pytest.mark.timeout(600)
def test_sigkilled_worker_restarts_from_the_drivers_latest_checkpoint(ray_cluster, undisturbed, tmp_path):
    weights, rows = undisturbed
    shared = tmp_path / "shared"
    shared.mkdir()
    seed_everything(0)
    model = Probe(str(shared), kill_rank=1, kill_at=5)  # checkpoints at steps 2 and 4 are on the driver by then
    trainer = _trainer(
        tmp_path,
        "killed",
        ray_cluster,
        max_failures=1,
        logger=CSVLogger(),
        callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True)],
    )
    trainer.fit(model, _loader())

    steps = _steps_by_attempt(shared)
    assert sorted(steps) == [1, 2]
    # Rank 0 may or may not have entered step 5 before the group was torn down; it never got past it.
    assert steps[1] in (list(range(5)), list(range(6))), steps[1]
    # Resumed from the step-4 checkpoint, mid-epoch: nothing before it was trained again.
    assert steps[2] == list(range(4, TOTAL_STEPS))
    assert trainer.global_step == TOTAL_STEPS
    _assert_same_weights(model, weights)

    ckpt_dir = tmp_path / "killed" / "checkpoints"
    saved = sorted(int(torch.load(p, weights_only=True)["global_step"]) for p in ckpt_dir.glob("epoch=*.ckpt"))
    assert saved == list(range(2, TOTAL_STEPS + 1, 2)), "every periodic checkpoint of both attempts is on the driver"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert last["global_step"] == TOTAL_STEPS
    assert torch.equal(last["state_dict"]["net.0.weight"], model.net[0].weight.detach())
    # The driver's log has each step once, with the losses of the undisturbed run.
    got = _csv_rows(trainer.logger.metrics_file_path)
    assert [s for s, _ in got] == [s for s, _ in rows]
    assert torch.allclose(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in rows]), atol=1e-6, rtol=0)
    assert trainer.attempts == 2  # the worker group ran twice
    recomputed = len(steps[1]) - steps[2][0]
    print(f"\nFAULT sigkill-worker: attempts=2, steps recomputed={recomputed} (checkpoint every 2), same weights")


@pytest.mark.timeout(600)
def test_worker_on_a_node_without_the_drivers_files_streams_everything_back(ray_cluster, add_node, tmp_path):
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    driver_node = _connect(ray_cluster)
    run_root = tmp_path / "runs"
    run_root.mkdir()
    (run_root / "driver-only").write_text("only the driver's node can see this")
    shared = tmp_path / "shared"  # outside run_root: both nodes see it
    shared.mkdir()
    other_node = add_node(cpus=2, resources={"slot": 1}, hide=[str(run_root)])
    assert other_node != driver_node

    # An earlier run's file by the name of this run's first checkpoint: it is kept, the new one is versioned. Rank 0
    # learns which names are taken from the driver's node, whichever node it runs on.
    earlier = run_root / "two-nodes" / "checkpoints" / "epoch=0-step=8.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's checkpoint")
    seed_everything(0)
    model = Probe(str(shared), driver_only=str(run_root / "driver-only"))
    trainer = Trainer(
        max_epochs=1,
        num_workers=2,
        address=ray_cluster,
        resources_per_worker={"slot": 1},  # one slot per node: one worker per node
        default_root_dir=str(run_root),
        run_name="two-nodes",
        log_every_n_steps=1,
        enable_progress_bar=False,
        logger=TensorBoardLogger(),
        callbacks=[ModelCheckpoint(every_n_train_steps=8, save_top_k=-1, save_last=True)],
    )
    trainer.fit(model, _loader())
    assert trainer.global_step == STEPS_PER_EPOCH

    placed = _nodes(shared, attempt=1)
    assert sorted(placed) == [0, 1]
    by_node = {r["node"]: r for r in placed.values()}
    assert set(by_node) == {driver_node, other_node}, f"one worker per node expected, got {placed}"
    # The run directory really was out of the other node's sight (no shared filesystem).
    assert by_node[driver_node]["sees_driver_files"] is True
    assert by_node[other_node]["sees_driver_files"] is False
    assert ray.get_runtime_context().get_node_id() == driver_node

    run_dir = run_root / "two-nodes"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [
        "epoch=0-step=16.ckpt", "epoch=0-step=24.ckpt", "epoch=0-step=8-v1.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"
    ]
    assert earlier.read_bytes() == b"an earlier run's checkpoint"
    assert torch.load(run_dir / "checkpoints" / "epoch=0-step=8-v1.ckpt", weights_only=True)["global_step"] == 8
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS_PER_EPOCH
    for name, value in model.state_dict().items():
        assert torch.equal(last["state_dict"][name], value), name
    assert trainer.checkpoint_callback.last_model_path == str(run_dir / "checkpoints" / "last.ckpt")

    events = [p for p in run_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert events, f"no TensorBoard event file in {run_dir}: {sorted(os.listdir(run_dir))}"
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == list(range(STEPS_PER_EPOCH))

    # Whichever node rank 0 lands on, its checkpoints reach the driver's directory: written in place from the
    # driver's node, streamed from the node that cannot see it. Saved from each node in turn, through a sink
    # actor on the driver's node as in a run.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from launcher.ray.driver_sink import DriverSink

    on = lambda node: NodeAffinitySchedulingStrategy(node, soft=False)  # noqa: E731
    sink = ray.remote(DriverSink).options(num_cpus=0, scheduling_strategy=on(driver_node)).remote(
        str(run_dir), [], None, None)
    save = ray.remote(num_cpus=0, max_retries=0)(_save_a_checkpoint)
    try:
        ways = {node: ray.get(save.options(scheduling_strategy=on(node)).remote(
                    sink, str(run_dir / "checkpoints" / f"from-{i}.ckpt"), i + 1))
                for i, node in enumerate([driver_node, other_node])}
        assert ways == {driver_node: "in place", other_node: "streamed"}
        assert ray.get(sink.latest_checkpoint.remote()) == str(run_dir / "checkpoints" / "from-1.ckpt")
    finally:
        ray.kill(sink, no_restart=True)
    for i in range(2):
        saved = torch.load(run_dir / "checkpoints" / f"from-{i}.ckpt", weights_only=True)
        assert saved["global_step"] == i + 1 and torch.equal(saved["state_dict"]["w"], torch.full((1000,), i + 1.0))
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing left over


@pytest.mark.timeout(600)
def test_preempted_node_checkpoints_just_in_time_and_the_run_finishes_on_the_remaining_node(
    ray_cluster, undisturbed, tmp_path
):
    weights, rows = undisturbed
    driver_node = _connect(ray_cluster)
    run_root = tmp_path / "runs"
    run_root.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    with _extra_node(ray_cluster, tmp_path / "node.log", cpus=2, hide=[str(run_root)]) as node:
        seed_everything(0)
        model = Probe(str(shared), slow_s=0.5, hold_after_save=True)
        trainer = _trainer(
            run_root,
            "preempted",
            ray_cluster,
            # One CPU each and SPREAD: one worker per node at first, and both fit on the head once the
            # drained node is gone. max_failures=0: a preemption has its own retry budget in Ray Train.
            resources_per_worker={"CPU": 1},
            placement_strategy="SPREAD",
            logger=CSVLogger(),
            callbacks=[ModelCheckpoint(save_last=True)],  # every epoch: nothing else saved mid-epoch
        )
        outcome: dict = {}

        def fit() -> None:
            try:
                trainer.fit(model, _loader())
            except BaseException as err:  # noqa: BLE001 - reported by the test thread
                outcome["error"] = err

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        _wait_for(
            lambda: max(_steps_by_attempt(shared).get(1, [-1])) >= 2 and len(_nodes(shared, 1)) == 2,
            240,
            "both ranks to start training",
            thread,
            outcome,
        )
        placed = {r["node"] for r in _nodes(shared, 1).values()}
        assert placed == {driver_node, node.id}, f"the first attempt should span both nodes, got {placed}"

        (shared / "drained").touch()
        drain_step = max(_steps_by_attempt(shared)[1])
        drained_at = time.time()
        drain = _ray(
            "drain-node", f"--address={ray_cluster}", f"--node-id={node.id}",
            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test",
            f"--deadline-remaining-seconds={DRAIN_DEADLINE_S}",
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        reclaim_at = time.time() + DRAIN_DEADLINE_S + 1  # the deadline counts from the command, which has returned

        last = run_root / "preempted" / "checkpoints" / "last.ckpt"
        _wait_for(last.exists, DRAIN_DEADLINE_S + 30, "the just-in-time checkpoint on the driver", thread, outcome)
        seen_at = time.time()
        jit_step = int(torch.load(last, weights_only=True)["global_step"])
        assert seen_at < drained_at + DRAIN_DEADLINE_S, f"committed {seen_at - drained_at:.1f} s after the drain"
        assert drain_step <= jit_step < STEPS_PER_EPOCH, (drain_step, jit_step)
        print(f"\nFAULT drain: just-in-time checkpoint committed {seen_at - drained_at:.1f} s after the drain "
              f"(deadline {DRAIN_DEADLINE_S} s), at step {jit_step}")

        # The machine goes away at the deadline, as a reclaimed spot instance does. (Ray counts a node's death as
        # a preemption only once the drain deadline has passed; a node lost earlier is an ordinary failure.)
        time.sleep(max(0.0, reclaim_at - time.time()))
        node.kill()
        thread.join(timeout=400)
        assert not thread.is_alive(), "fit did not return after the preempted node went away"
    assert "error" not in outcome, outcome.get("error")

    steps = _steps_by_attempt(shared)
    assert sorted(steps) == [1, 2]
    assert steps[2] == list(range(jit_step, TOTAL_STEPS)), "the second attempt resumes at the just-in-time checkpoint"
    assert {r["node"] for r in _nodes(shared, 2).values()} == {driver_node}
    assert trainer.global_step == TOTAL_STEPS
    _assert_same_weights(model, weights)
    got = _csv_rows(trainer.logger.metrics_file_path)
    assert [s for s, _ in got] == [s for s, _ in rows]
    assert torch.allclose(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in rows]), atol=1e-6, rtol=0)
    assert trainer.attempts == 2  # the worker group ran twice


class _KillsItsLoaderWorker(torch.utils.data.Dataset):
    """The Probe's data, served by DataLoader worker processes; the first to fetch item ``kill_after`` dies (SIGKILL)."""

    def __init__(self, shared: str, kill_after: int):
        self.data = _loader().dataset
        self.shared, self.kill_after = shared, kill_after
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        self.fetched += 1
        if self.fetched == self.kill_after and torch.utils.data.get_worker_info() is not None:
            try:  # exactly one loader worker of the whole run dies: the one that creates the marker
                fd = os.open(os.path.join(self.shared, "loader-killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return self.data[index]
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[index]


@pytest.mark.timeout(600)
def test_killed_dataloader_worker_fails_the_attempt_and_the_run_resumes(ray_cluster, undisturbed, tmp_path):
    weights, rows = undisturbed
    shared = tmp_path / "shared"
    shared.mkdir()
    seed_everything(0)
    model = Probe(str(shared))
    trainer = _trainer(
        tmp_path, "loader-killed", ray_cluster, max_failures=1, logger=CSVLogger(),
        callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True)],
    )
    # Same samples and order as the undisturbed run (same shuffling generator draws), served by 2 loader workers.
    loader = DataLoader(_KillsItsLoaderWorker(str(shared), kill_after=14), batch_size=2, shuffle=True, num_workers=2)
    started = time.monotonic()
    trainer.fit(model, loader)
    elapsed = time.monotonic() - started

    assert (shared / "loader-killed").exists(), "no DataLoader worker was killed"
    steps = _steps_by_attempt(shared)
    assert sorted(steps) == [1, 2], "the dead loader worker failed the first attempt and Ray Train restarted it"
    assert trainer.attempts == 2
    resumed_at = steps[2][0]
    assert resumed_at > 0 and resumed_at % 2 == 0, f"resumed from a periodic checkpoint, not from scratch: {steps}"
    assert steps[2] == list(range(resumed_at, TOTAL_STEPS))
    assert trainer.global_step == TOTAL_STEPS
    _assert_same_weights(model, weights)
    got = _csv_rows(trainer.logger.metrics_file_path)
    assert [s for s, _ in got] == [s for s, _ in rows], "each step logged once"
    print(f"\nFAULT loader-worker: attempts=2, resumed at step {resumed_at}, run {elapsed:.1f} s, same weights")
