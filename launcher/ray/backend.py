"""Run a job on Ray Train V2 workers and bring its results back to the driver.

Ray Train's ``TorchTrainer`` owns the worker group, placement, the process
group and restarts (``FailureConfig``). We add the driver-side sink actor,
pinned to this node, that receives metrics and checkpoints, and we turn
worker failures into one readable exception.
"""

from __future__ import annotations

import linecache
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from launcher.ray.driver_sink import DriverSink
from launcher.ray.job import Job, serialize_job

POLL_SECONDS = 0.2


class WorkerError(RuntimeError):
    """One or more Ray Train workers failed; the message names the ranks and carries their tracebacks."""

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})

    def __reduce__(self):
        return (type(self), (str(self), self.failures))


@dataclass
class RayRunSettings:
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float] | None
    placement_strategy: str
    address: str | None
    max_failures: int
    run_name: str
    run_dir: str


def ensure_ray(address: str | None) -> None:
    """Connect to ``address`` ("auto", "host:port", "ray://..."), or start/join a local Ray when None."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
    if address is not None:
        kwargs.pop("include_dashboard")
        import launcher
        import runtime

        # Remote nodes may not have this package installed: ship it with the job.
        kwargs["runtime_env"] = {"py_modules": [runtime, launcher]}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not reach a Ray cluster at address={address!r}: {err}. Check that the head node is running "
            "(`ray status`), that the address is right, and that RAY_AUTH_MODE=token is set with the cluster's "
            "token in ~/.ray/auth_token when the cluster uses token authentication"
        ) from err


_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), in ')


def _with_driver_source(tb: str) -> str:
    """Fill in source lines a remote worker could not read (the user's files live on the driver)."""
    lines = tb.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        has_source = i + 1 < len(lines) and lines[i + 1].startswith("    ") and not _FRAME.match(lines[i + 1])
        if match and not has_source:
            source = linecache.getline(match["path"], int(match["line"])).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out)


def _worker_error(err: Exception) -> WorkerError:
    failures = getattr(err, "worker_failures", None)
    if not failures:
        return WorkerError(f"the Ray Train run failed: {err}")
    by_message: dict[str, list[int]] = {}
    for rank, failure in sorted(failures.items()):
        # Identical tracebacks from several ranks are shown once: "[Rank 0, 1]: ...".
        error_type = getattr(failure, "error_type", type(failure).__name__)
        message = getattr(failure, "message", None)
        headline = f"{error_type}: {message.splitlines()[0]}" if message else error_type
        text = getattr(failure, "tb", None) or str(failure)
        by_message.setdefault(f"{headline}\n{_with_driver_source(text)}".strip(), []).append(rank)
    parts = []
    for message, ranks in by_message.items():
        label = ", ".join(str(r) for r in ranks)
        parts.append(f"[Rank {label}]: {message}")
    return WorkerError(
        "the training workers failed:\n" + "\n".join(parts), {r: str(f) for r, f in failures.items()}
    )


def run_job(
    job: Job,
    settings: RayRunSettings,
    loggers: list[Any],
    resume_from: str | None,
    resume_step: int | None,
    on_progress: Callable[[Any], None],
    payload: bytes | None = None,
) -> dict[str, Any]:
    """Run ``job`` on Ray Train workers; returns what rank 0 sent back (weights, metrics, results).

    ``payload``: ``serialize_job(job)`` when the caller already made it (to keep it in the run directory),
    so the job is pickled once.
    """
    if payload is None:
        payload = serialize_job(job)  # fails here, before anything is scheduled, if the job cannot travel
    ensure_ray(settings.address)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from launcher.ray.worker import train_loop_per_worker

    node_id = ray.get_runtime_context().get_node_id()
    sink = (
        ray.remote(DriverSink)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        .remote(settings.run_dir, cloudpickle.loads(cloudpickle.dumps(loggers)), resume_from, resume_step)
    )
    result_path = os.path.join(settings.run_dir, f".result-{uuid.uuid4().hex[:8]}.pkl")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": ray.put(payload), "sink": sink, "result_path": result_path},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=settings.resources_per_worker,
            placement_strategy=settings.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=f"{settings.run_name}-{job.stage}-{uuid.uuid4().hex[:6]}",
            storage_path=os.path.join(settings.run_dir, ".ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        ),
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the driver's main thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="raylight-ray-train", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            for update in ray.get(sink.take_progress.remote()):
                on_progress(update)
        for update in ray.get(sink.take_progress.remote()):
            on_progress(update)
        attempts = ray.get(sink.attempt_count.remote())
    finally:
        ray.kill(sink, no_restart=True) if "error" in outcome else None
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, ray.train.TrainingFailedError):
            raise _worker_error(err) from None
        raise err
    try:
        with open(result_path, "rb") as f:
            result = cloudpickle.load(f)
    finally:
        if os.path.exists(result_path):
            os.remove(result_path)
        ray.kill(sink, no_restart=True)
    result["attempts"] = attempts
    return result
