"""What runs inside each Ray Train worker: the runtime, with sinks that stream to the driver."""

from __future__ import annotations

import io
import os
import tempfile
import time
import traceback
from typing import Any

import cloudpickle
import torch

from launcher.ray.driver_sink import CHUNK_BYTES
from runtime.checkpoint.io import check_weights_only_safe, load_checkpoint
from runtime.engine import Engine
from runtime.sinks import Progress
from runtime.strategy import Strategy

# Progress updates are cheap to make and costly to send: at most this many per second cross to the driver.
PROGRESS_PER_SECOND = 5.0
# Chunks in flight per upload: bounds the memory a checkpoint occupies in the object store.
UPLOAD_WINDOW = 2


class RemoteMetricsSink:
    """Rank 0's metric rows and progress, sent to the driver's sink actor (fire and forget, in order)."""

    def __init__(self, actor: Any):
        self.actor = actor
        self._last_progress = 0.0

    def log_metrics(self, metrics, step: int) -> None:
        self.actor.log_metrics.remote(dict(metrics), step)

    def log_hyperparams(self, params) -> None:
        self.actor.log_hyperparams.remote(_plain(dict(params)))

    def progress(self, update: Progress) -> None:
        now = time.monotonic()
        last_of_pass = update.total is not None and update.batch_idx >= update.total
        if now - self._last_progress >= 1.0 / PROGRESS_PER_SECOND or last_of_pass:
            self._last_progress = now
            self.actor.progress.remote(update)

    def finalize(self, status: str) -> None:
        import ray

        ray.get(self.actor.finalize.remote(status))


class _LoggerStandIn:
    """Tells callbacks (LearningRateMonitor) that the driver has loggers; rows go through the metrics sink."""

    def log_metrics(self, metrics, step) -> None:  # pragma: no cover - rows travel via the sink
        pass


def upload_file(actor: Any, local_path: str, remote_path: str, is_checkpoint: bool) -> None:
    """Stream a local file to ``remote_path`` on the driver in bounded chunks, committed atomically there."""
    import ray

    token = ray.get(actor.upload_begin.remote(remote_path))
    pending: list[Any] = []
    try:
        with open(local_path, "rb") as f:
            while True:
                data = f.read(CHUNK_BYTES)
                if not data:
                    break
                pending.append(actor.upload_chunk.remote(token, data))
                if len(pending) >= UPLOAD_WINDOW:
                    ray.get(pending.pop(0))
        ray.get(pending)
        ray.get(actor.upload_commit.remote(token, is_checkpoint))
    except BaseException:
        actor.upload_abort.remote(token)
        raise


def download_file(actor: Any, remote_path: str, local_path: str) -> None:
    import ray

    size = ray.get(actor.file_size.remote(remote_path))
    with open(local_path, "wb") as f:
        for offset in range(0, size, CHUNK_BYTES):
            f.write(ray.get(actor.read_chunk.remote(remote_path, offset, CHUNK_BYTES)))


class RemoteCheckpointSink:
    """Checkpoints go to a local temp file, then stream to the driver's run directory."""

    def __init__(self, actor: Any):
        self.actor = actor

    def save(self, checkpoint: dict[str, Any], path: str) -> None:
        check_weights_only_safe(checkpoint)
        fd, tmp = tempfile.mkstemp(prefix="raylight-ckpt-", suffix=".pt")
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            upload_file(self.actor, tmp, path, is_checkpoint=True)
        finally:
            os.remove(tmp)

    def remove(self, path: str) -> None:
        import ray

        ray.get(self.actor.remove.remote(path))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _preemption_probe(every_n_steps: int):
    import ray.train

    calls = [0]
    announced = [False]

    def probe() -> bool:
        # get_preemption_info is a barrier across the workers, so every rank asks on the same steps.
        calls[0] += 1
        if calls[0] % every_n_steps:
            return False
        info = ray.train.get_preemption_info()
        if info is None or announced[0]:
            return False
        announced[0] = True
        return True

    return probe


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point."""
    import ray
    import ray.train

    actor = config["sink"]
    job = cloudpickle.loads(ray.get(config["job"]))
    rank = ray.train.get_context().get_world_rank()
    resume_from = ray.get(actor.begin_attempt.remote())

    checkpoint = None
    if resume_from is not None:
        fd, tmp = tempfile.mkstemp(prefix="raylight-resume-", suffix=".pt")
        os.close(fd)
        try:
            download_file(actor, resume_from, tmp)
            checkpoint = load_checkpoint(tmp)
        finally:
            os.remove(tmp)

    strategy = Strategy(job.config.accelerator)
    engine = Engine(
        job.config,
        callbacks=job.callbacks,
        metrics_sink=RemoteMetricsSink(actor) if rank == 0 else None,
        checkpoint_sink=RemoteCheckpointSink(actor),
        loggers=[_LoggerStandIn() for _ in range(job.logger_count)],
        strategy=strategy,
        preemption_probe=_preemption_probe(job.preemption_check_every_n_steps) if job.stage == "fit" else None,
    )
    if job.initial_progress is not None:
        engine.current_epoch, engine.global_step = job.initial_progress
    try:
        _run_stage(job, engine, checkpoint, resume_from, actor, config["result_path"], rank)
    except Exception as err:
        # Ray Train reports each rank's exception to the driver; carry the hook and the full traceback.
        raise WorkerStepError(rank, err, traceback.format_exc()) from None


class WorkerStepError(RuntimeError):
    """A rank's exception, with its traceback as text (it crosses processes)."""

    def __init__(self, rank: int, error: BaseException | str, tb: str):
        self.rank = rank
        self.error_type = error if isinstance(error, str) else type(error).__name__
        self.tb = tb
        super().__init__(f"{self.error_type} on rank {rank}:\n{tb.rstrip()}")

    def __reduce__(self):
        return (type(self), (self.rank, self.error_type, self.tb))


def _run_stage(job, engine: Engine, checkpoint, resume_from, actor, result_path: str, rank: int) -> None:
    module = job.module
    result: dict[str, Any] = {}
    if job.stage == "fit":
        engine.fit(module, job.train_dataloaders, job.val_dataloaders, job.datamodule, checkpoint, resume_from)
    elif job.stage in ("validate", "test"):
        run = engine.test if job.stage == "test" else engine.validate
        result["results"] = run(module, job.dataloaders, job.datamodule, checkpoint, resume_from)
    else:
        result["predictions"] = engine.predict(module, job.dataloaders, job.datamodule, checkpoint, resume_from)

    if rank != 0:
        return
    result.update(
        state_dict={k: v.detach().cpu() for k, v in module.state_dict().items()},
        callback_metrics={k: float(v) for k, v in engine.callback_metrics.items()},
        logged_metrics={k: float(v) for k, v in engine.logged_metrics.items()},
        progress_bar_metrics=dict(engine.progress_bar_metrics),
        current_epoch=engine.current_epoch,
        global_step=engine.global_step,
        should_stop=engine.should_stop,
        callbacks={cb.state_key: cb.state_dict() for cb in engine.callbacks},
    )
    buffer = io.BytesIO()
    cloudpickle.dump(result, buffer)
    fd, tmp = tempfile.mkstemp(prefix="raylight-result-")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        upload_file(actor, tmp, result_path, is_checkpoint=False)
    finally:
        os.remove(tmp)
