"""What runs inside each Ray Train worker: the runtime, with sinks that send metrics and files to the driver."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
import tempfile
import time
import traceback
import uuid
from typing import Any, Callable

import cloudpickle
import numpy as np
import torch

from launcher.ray.driver_sink import CHUNK_BYTES
from launcher.ray.job import TUNE_MALLOC_ENV
from runtime.checkpoint.io import check_weights_only_safe, load_checkpoint
from runtime.seed import SEED_ENV, restore_rng_state
from runtime.engine import Engine
from runtime.sinks import Progress
from runtime.strategy import Strategy

# Progress updates are cheap to make and costly to send: at most this many per second cross to the driver.
PROGRESS_PER_SECOND = 5.0
# Chunks in flight per upload or download: bounds the memory a checkpoint occupies in the object store.
UPLOAD_WINDOW = 2
# glibc malloc settings for a training worker (see tune_allocator); RAYLIGHT_TUNE_MALLOC=0 keeps glibc's own.
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h


def tune_allocator(enabled: bool = True) -> bool:
    """Keep memory a training step frees for the next step, instead of handing it back to the kernel.

    glibc serves blocks above a moving threshold (128 KiB to start) with their own mappings and trims the
    heap top past 128 KiB free, so every step maps, faults in and unmaps its larger temporaries again; on a
    VM, memory the kernel has just been given back is expensive to touch. Fixed thresholds (blocks up to
    32 MiB from the heap; up to 256 MiB of free heap kept) make a step reuse the last one's memory. Ray Train
    V2 runs the training function in a thread, whose glibc arena keeps freed memory either way; there the
    mmap threshold is the setting that changes what a step does (``tests/ray/test_ray_fit.py`` checks it). Returns
    whether it applied: not on another C library, nor where the user set ``MALLOC_*_THRESHOLD_`` or
    ``RAYLIGHT_TUNE_MALLOC=0`` (here, or on the driver: ``enabled=False``).
    """
    if not enabled or os.environ.get(TUNE_MALLOC_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user's own settings win
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, say)
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


class RemoteMetricsSink:
    """Rank 0's metric rows and progress, sent to the driver's sink actor (fire and forget, in order).

    Only what the driver uses is sent: rows when it has loggers, progress when it shows a bar (an actor
    call costs the training thread about a millisecond).
    """

    def __init__(self, actor: Any, has_loggers: bool = True, wants_progress: bool = True):
        self.actor = actor
        self.wants_metrics = has_loggers  # the engine builds no rows otherwise
        self.wants_progress = wants_progress
        self._last_progress = 0.0

    def log_metrics(self, metrics, step: int) -> None:
        if self.wants_metrics:
            self.actor.log_metrics.remote(dict(metrics), step)

    def log_hyperparams(self, params) -> None:
        self.actor.log_hyperparams.remote(_plain(dict(params)))

    def progress(self, update: Progress) -> None:
        # Only called when wants_progress: the engine reads that attribute and skips progress otherwise.
        now = time.monotonic()
        last_of_pass = update.total is not None and update.batch_idx >= update.total
        if now - self._last_progress >= 1.0 / PROGRESS_PER_SECOND or last_of_pass:
            self._last_progress = now
            # Floats, made only for the updates that are sent (the engine keeps step values as tensors).
            metrics = {k: float(v) for k, v in update.metrics.items()}
            self.actor.progress.remote(dataclasses.replace(update, metrics=metrics))

    def flush(self) -> None:
        # No wait: the sink actor runs this caller's calls in order, so the loggers flush before the
        # checkpoint that follows is committed.
        self.actor.flush.remote()

    def finalize(self, status: str) -> None:
        import ray

        ray.get(self.actor.finalize.remote(status))


class _LoggerStandIn:
    """Tells callbacks (LearningRateMonitor) that the driver has loggers; rows go through the metrics sink."""

    def log_metrics(self, metrics, step) -> None:  # pragma: no cover - rows travel via the sink
        pass


class _ChunkStream:
    """A write-only file that sends what is written to the sink actor in CHUNK_BYTES pieces.

    At most UPLOAD_WINDOW chunks are in flight, so the object store holds a bounded part of a
    checkpoint however large it is, and serialising the next chunk overlaps with the sink
    writing the previous one.
    """

    def __init__(self, actor: Any, token: str):
        self._actor, self._token = actor, token
        self._buffer = bytearray()
        self._pending: list[Any] = []

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        if self._buffer:
            take = min(CHUNK_BYTES - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == CHUNK_BYTES:
                self._send_buffer()
        while len(view) >= CHUNK_BYTES:
            # Large tensors go out without passing through the buffer, as numpy views: Ray copies them
            # into the object store once, and the sink writes them to disk from there without a copy.
            self._send(np.frombuffer(view[:CHUNK_BYTES], dtype=np.uint8))
            view = view[CHUNK_BYTES:]
        if len(view):
            self._buffer += view
        return written

    def flush(self) -> None:
        pass  # chunks leave when full; finish() sends the rest

    def _send_buffer(self) -> None:
        # As a numpy array, like the large pieces: sent as ``bytes`` it would be copied once more here and
        # once more by the sink (Ray hands raw bytes over as a fresh copy). Ray copies the argument into the
        # object store when the call is made, so a new buffer is only a precaution.
        self._send(np.frombuffer(self._buffer, dtype=np.uint8))
        self._buffer = bytearray()

    def _send(self, chunk: np.ndarray) -> None:
        import ray

        self._pending.append(self._actor.upload_chunk.remote(self._token, chunk))
        if len(self._pending) >= UPLOAD_WINDOW:
            ray.get(self._pending.pop(0))

    def finish(self) -> None:
        import ray

        if self._buffer:
            self._send_buffer()
        ray.get(self._pending)
        self._pending.clear()


def upload(
    actor: Any, remote_path: str, is_checkpoint: bool, write: Callable[[Any], None], progress: dict | None = None
) -> Any:
    """Stream what ``write(file)`` writes to ``remote_path`` on the driver, in bounded chunks; returns the
    reference of its atomic commit there (sent, not waited for).

    No local copy: ``torch.save``/``cloudpickle.dump`` write straight into the chunks, so a checkpoint
    is serialised once and never written to, or read back from, this worker's disk.
    """
    import ray

    token = ray.get(actor.upload_begin.remote(remote_path))
    try:
        stream = _ChunkStream(actor, token)
        write(stream)
        stream.finish()  # every chunk is written: only a complete file is ever committed
    except BaseException:
        actor.upload_abort.remote(token)
        raise
    return actor.upload_commit.remote(token, is_checkpoint, progress)


class DriverFiles:
    """Files this worker writes into the driver's run directory (checkpoints, the stage's result).

    A worker that sees that directory (it runs on the driver's node, or both share a filesystem) writes
    the file there itself, as fast as a local ``torch.save``; any other worker streams it through the
    sink actor. Which one is decided once, by reading back a file the actor has just written.
    ``in_place=False`` always streams (``RAYLIGHT_STREAM_FILES=1``: measures another node's path on one).

    Either way the actor commits the complete file (fsync, rename, fsync of the directory) while
    training goes on: the actor runs this worker's calls in order, so a removal or the next file comes
    after the commit, and a failed commit raises at this worker's next file, or at ``confirm``.
    """

    def __init__(self, actor: Any, in_place: bool = True):
        self.actor = actor
        self._sees_driver_directory: bool | None = None if in_place else False
        self._unconfirmed: list[Any] = []  # commits and removals sent, not yet known to have worked

    def sees_driver_directory(self) -> bool:
        if self._sees_driver_directory is None:
            import ray

            path, token = ray.get(self.actor.filesystem_probe.remote())
            try:
                with open(path) as f:
                    same = f.read() == token
                self._sees_driver_directory = same and os.access(os.path.dirname(path), os.W_OK)
            except OSError:
                self._sees_driver_directory = False
            self.remove(path)
        return self._sees_driver_directory

    def confirm(self) -> None:
        """Wait until every commit and removal sent so far is done; raises the first one's error."""
        import ray

        unconfirmed, self._unconfirmed = self._unconfirmed, []
        ray.get(unconfirmed)

    def write(
        self,
        remote_path: str,
        is_checkpoint: bool,
        write: Callable[[Any], None],
        progress: dict | None = None,
        wait: bool = False,
    ) -> None:
        """``write(file)`` becomes ``remote_path`` on the driver; with ``wait``, returns once it (and every file
        before it) is committed."""
        tmp = None
        if self.sees_driver_directory():
            # The hidden file is announced before it exists, so that if this worker dies while writing it,
            # the actor removes it when the next attempt begins. The announcement must have arrived first:
            # one sent just before a kill can be lost with the worker (confirm() below waits for it).
            directory = os.path.dirname(remote_path) or "."
            tmp = os.path.join(directory, f".{os.path.basename(remote_path)}.written-{uuid.uuid4().hex[:8]}")
            self._unconfirmed.append(self.actor.expect_written.remote(tmp))
        self.confirm()  # the previous file's commit (long done by now, unless it failed), and the announcement
        if tmp is not None:
            self._unconfirmed.append(self._write_in_place(tmp, remote_path, is_checkpoint, write, progress))
        else:
            self._unconfirmed.append(upload(self.actor, remote_path, is_checkpoint, write, progress))
        if wait:
            self.confirm()

    def remove(self, remote_path: str) -> None:
        self._unconfirmed.append(self.actor.remove.remote(remote_path))

    def _write_in_place(
        self, tmp: str, remote_path: str, is_checkpoint: bool, write: Callable[[Any], None], progress: dict | None
    ) -> Any:
        """``tmp``, a hidden file next to ``remote_path`` that the actor expects; returns the reference of the
        actor's commit of it."""
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        # Not mkstemp: its file is private to this user; this one gets the permissions a streamed one gets.
        try:
            with open(tmp, "xb") as f:
                write(f)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return self.actor.commit_written.remote(tmp, remote_path, is_checkpoint, progress)


def download_file(actor: Any, remote_path: str, local_path: str) -> None:
    """Copy ``remote_path`` from the driver's node in chunks, UPLOAD_WINDOW of them requested ahead.

    Asking for the next chunks before writing the current one hides the round trip to the sink
    actor, which otherwise costs as much as the copy itself.
    """
    import ray

    size = ray.get(actor.file_size.remote(remote_path))
    pending: list[Any] = []
    with open(local_path, "wb") as f:
        for offset in range(0, size, CHUNK_BYTES):
            pending.append(actor.read_chunk.remote(remote_path, offset, CHUNK_BYTES))
            if len(pending) > UPLOAD_WINDOW:
                f.write(ray.get(pending.pop(0)))
        for ref in pending:
            f.write(ray.get(ref))


def _sees_same_file(actor: Any, remote_path: str) -> bool:
    """Whether ``remote_path`` here is the very file the driver's node has there (same device, inode, size, mtime).

    True for a worker on the driver's node; on another node the path is absent or another file, and the
    checkpoint is copied through Ray instead.
    """
    import ray

    try:
        here = os.stat(remote_path)
    except OSError:
        return False
    ours = (here.st_dev, here.st_ino, here.st_size, here.st_mtime_ns)
    return ours == tuple(ray.get(actor.file_identity.remote(remote_path)))


class RemoteCheckpointSink:
    """Checkpoints go to the driver's run directory: written there in place, or streamed as ``torch.save`` writes."""

    def __init__(self, files: DriverFiles):
        self.files = files

    def save(self, checkpoint: dict[str, Any], path: str) -> None:
        check_weights_only_safe(checkpoint)
        progress = {"epoch": int(checkpoint.get("epoch", 0)), "global_step": int(checkpoint.get("global_step", 0))}
        self.files.write(path, True, lambda stream: torch.save(checkpoint, stream), progress)

    def remove(self, path: str) -> None:
        self.files.remove(path)

    def listdir(self, directory: str) -> list[str]:
        import ray

        return ray.get(self.files.actor.listdir.remote(directory))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _preemption_notice_reader():
    """A callable telling whether Ray Train has pushed a preemption notice into this worker, or None.

    Ray Train's preemption watcher pushes the notice into every worker of the group; the public
    ``ray.train.get_preemption_info()`` then agrees on it through a round trip to a Ray actor
    (about 7 ms a call here, 40% of a small step). Reading the pushed notice and agreeing with one
    tiny ``torch.distributed`` broadcast costs microseconds. None when Ray's internals have moved:
    every rank then uses the public call (the same answer on every rank: same Ray version).
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        context = get_train_context().preemption_context
    except (ImportError, AttributeError):
        return None
    return lambda: context.preemption_info is not None


# A preemption check is at most this many steps after the previous one, however fast the steps are.
MAX_STEPS_BETWEEN_PREEMPTION_CHECKS = 1000


def _preemption_probe(strategy: Strategy, check_seconds: float):
    """Called by the fit loop at every step boundary; True once, on the step where the run must checkpoint.

    A check is a collective, so every rank checks on the same steps: rank 0 decides, from its own step
    times, how many steps until the next check (about ``check_seconds`` away) and broadcasts that with
    its answer. Ray Train's watcher polls for drains every few seconds, so a second's lag costs nothing.
    """
    import ray.train

    read_notice = _preemption_notice_reader()
    packed = torch.zeros(2, dtype=torch.int64)  # [preempted, steps until the next check]
    state = {"step": 0, "next_check": 1, "last_step": 0, "last_time": time.monotonic(), "announced": False}

    def probe() -> bool:
        state["step"] += 1
        if state["announced"] or state["step"] < state["next_check"]:
            return False
        if read_notice is None:
            notice = ray.train.get_preemption_info() is not None  # a collective of its own: same on every rank
        else:
            notice = strategy.global_rank == 0 and read_notice()
        now = time.monotonic()
        seconds_per_step = (now - state["last_time"]) / max(1, state["step"] - state["last_step"])
        steps = int(check_seconds / seconds_per_step) if seconds_per_step > 0 else MAX_STEPS_BETWEEN_PREEMPTION_CHECKS
        packed[0], packed[1] = int(notice), max(1, min(steps, MAX_STEPS_BETWEEN_PREEMPTION_CHECKS))
        agreed = strategy.broadcast_tensor(packed)
        state.update(last_step=state["step"], last_time=now, next_check=state["step"] + int(agreed[1]))
        state["announced"] = bool(agreed[0])
        return state["announced"]

    return probe


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    try:
        _run_worker(config, rank)
    except Exception as err:
        # Ray Train reports each rank's exception to the driver; carry the hook and the full traceback.
        raise WorkerStepError(rank, type(err).__name__, _traceback_text(err), str(err)) from None


def _run_worker(config: dict[str, Any], rank: int) -> None:
    import ray

    actor = config["sink"]
    job = cloudpickle.loads(ray.get(config["job"]))
    tune_allocator(job.tune_malloc)
    resume_from = ray.get(actor.begin_attempt.remote(rank))

    checkpoint = None
    if resume_from is not None and _sees_same_file(actor, resume_from):
        checkpoint = load_checkpoint(resume_from)  # this worker is on the driver's node: no copy needed
    elif resume_from is not None:
        fd, tmp = tempfile.mkstemp(prefix="raylight-resume-", suffix=".pt")
        os.close(fd)
        try:
            download_file(actor, resume_from, tmp)
            checkpoint = load_checkpoint(tmp)
        finally:
            os.remove(tmp)

    _seed_like_the_driver(job)
    files = DriverFiles(actor, in_place=not job.stream_files)
    strategy = Strategy(job.config.accelerator, job.config.find_unused_parameters)
    engine = Engine(
        job.config,
        callbacks=job.callbacks,
        metrics_sink=(
            RemoteMetricsSink(actor, has_loggers=job.logger_count > 0, wants_progress=job.progress_bar)
            if rank == 0
            else None
        ),
        checkpoint_sink=RemoteCheckpointSink(files),
        loggers=[_LoggerStandIn() for _ in range(job.logger_count)],
        strategy=strategy,
        preemption_probe=_preemption_probe(strategy, job.preemption_check_seconds) if job.stage == "fit" else None,
    )
    if job.initial_progress is not None:
        engine.continue_from(*job.initial_progress)
    _run_stage(job, engine, checkpoint, resume_from, files, config["result_path"], rank)


def _seed_like_the_driver(job) -> None:
    """Every rank continues from the driver's generators (a restart then resumes from the checkpoint's)."""
    os.environ.update(job.seed_environment)
    if job.rng_state is not None:
        restore_rng_state(job.rng_state)
    if SEED_ENV in job.seed_environment and torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(job.seed_environment[SEED_ENV]))  # lazy: does not initialise CUDA


# cloudpickle names the file of code it pickled by value (the user's script, their project) like this.
_BY_VALUE_FILENAME = "<dynamic-code>"


def _traceback_text(err: BaseException) -> str:
    """``err``'s traceback, with frames of code pickled by value pointing at its source file on the driver."""
    summary = traceback.TracebackException(type(err), err, err.__traceback__, lookup_lines=False)
    pending, seen = [(summary, err)], set()
    while pending:
        te, exc = pending.pop()
        if te is None or exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        for i, (entry, frame) in enumerate(zip(te.stack, frames)):
            source = frame.f_globals.get("__file__") if entry.filename == _BY_VALUE_FILENAME else None
            if source:
                te.stack[i] = traceback.FrameSummary(source, entry.lineno, entry.name)
        pending += [(te.__cause__, exc.__cause__), (te.__context__, exc.__context__)]
    return "".join(summary.format())


class WorkerStepError(RuntimeError):
    """A rank's exception, with its traceback as text (it crosses processes)."""

    def __init__(self, rank: int, error_type: str, tb: str, message: str = ""):
        self.rank = rank
        self.error_type = error_type
        self.tb = tb
        self.message = message
        super().__init__(f"{error_type} on rank {rank}:\n{tb.rstrip()}")

    def __reduce__(self):
        return (type(self), (self.rank, self.error_type, self.tb, self.message))


def _run_stage(job, engine: Engine, checkpoint, resume_from, files: DriverFiles, result_path: str, rank: int) -> None:
    module = job.module
    result: dict[str, Any] = {}
    if job.stage == "fit":
        engine.fit(module, job.train_dataloaders, job.val_dataloaders, job.datamodule, checkpoint, resume_from)
    elif job.stage in ("validate", "test"):
        run = engine.test if job.stage == "test" else engine.validate
        result["results"] = run(module, job.dataloaders, job.datamodule, checkpoint, resume_from)
    else:
        result["predictions"] = engine.predict(
            module, job.dataloaders, job.datamodule, checkpoint, resume_from, job.return_predictions
        )

    files.confirm()  # a failed checkpoint commit fails the stage, on the rank that sent it
    if rank != 0:
        return
    result.update(
        state_dict={k: v.detach().cpu() for k, v in module.state_dict().items()},
        callback_metrics={k: float(v) for k, v in engine.callback_metrics.items()},
        logged_metrics={k: float(v) for k, v in engine.logged_metrics.items()},
        progress_bar_metrics=dict(engine.progress_bar_metrics),
        current_epoch=engine.current_epoch,
        global_step=engine.global_step,
        batches_that_stepped=engine.fit_loop_batches_that_stepped,
        should_stop=engine.should_stop,
        callbacks={cb.state_key: cb.state_dict() for cb in engine.callbacks},
    )
    files.write(result_path, False, lambda stream: cloudpickle.dump(result, stream), wait=True)
