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
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from launcher.ray.driver_sink import DriverSink
from launcher.run_dir import end_status
from launcher.ray.job import Job, serialize_job

POLL_SECONDS = 0.2

# Ray Train knobs, with defaults chosen for short runs on a laptop; a value set in the environment
# wins. Ray Train's controller polls the worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default): the poll is how it learns that training ended or that a worker died.
# tests/benchmarks/bench_health_check.py measured 0.2 s against 0.5 s and 2 s: fit() returns 0.45 s
# after the last step against 0.98 s and 1.39 s, and the polls cost ~12 ms of CPU a second more
# than at 2 s (the controller's and both workers' together: 0.6% of a 2-core machine).
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# How long Ctrl-C waits for Ray Train to stop the workers before giving up on a clean stop.
ABORT_SECONDS = 30.0


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
    collective_timeout_s: float = 1800.0
    resource_wait_s: float = 60.0


def ensure_ray(address: str | None) -> None:
    """Connect to ``address`` ("auto", "host:port"), or start/join a local Ray when None."""
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
    _wait_for_room(settings)  # before anything is created on the cluster
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The sink actor's process starts while this one imports Ray Train.
    node_id = ray.get_runtime_context().get_node_id()
    sink = (
        ray.remote(DriverSink)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        .remote(settings.run_dir, cloudpickle.loads(cloudpickle.dumps(loggers)), resume_from, resume_step)
    )
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.ray.worker import train_loop_per_worker

    for name, value in RAY_TRAIN_DEFAULTS.items():
        os.environ.setdefault(name, value)  # read when the controller starts; Ray passes it on to the workers
    result_path = os.path.join(settings.run_dir, f".result-{uuid.uuid4().hex[:8]}.pkl")
    trainer = _interruptible(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config={"job": ray.put(payload), "sink": sink, "result_path": result_path},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=settings.resources_per_worker,
            placement_strategy=settings.placement_strategy,
        ),
        torch_config=TorchConfig(timeout_s=max(1, round(settings.collective_timeout_s))),
        run_config=ray.train.RunConfig(
            name=f"{settings.run_name}-{job.stage}-{uuid.uuid4().hex[:6]}",
            # Only Ray Train's controller writes here (a marker file), and it runs on the driver's node:
            # the workers never report checkpoints to Ray, so other nodes never need this path.
            storage_path=os.path.join(settings.run_dir, ".ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        ),
    )

    # Without a progress bar nothing polls the sink (rank 0 sends no progress either): on a small machine
    # every actor call competes with the workers for the same cores.
    progress = _ProgressPump(sink, on_progress) if job.progress_bar else None
    try:
        trainer.fit()  # on this thread, so that Ctrl-C reaches it (see _interruptible)
    except BaseException as err:
        if progress is not None:
            progress.stop()
        _remove_unfinished(sink, finalize=end_status(err))
        ray.kill(sink, no_restart=True)
        if isinstance(err, ray.train.TrainingFailedError):
            raise _worker_error(err) from None
        raise
    if progress is not None:
        progress.stop()
    attempts = ray.get(sink.attempt_count.remote())
    _remove_unfinished(sink)
    try:
        with open(result_path, "rb") as f:
            result = cloudpickle.load(f)
    finally:
        if os.path.exists(result_path):
            os.remove(result_path)
        ray.kill(sink, no_restart=True)
    result["attempts"] = attempts
    return result


def _remove_unfinished(sink: Any, finalize: str | None = None) -> None:
    """Remove the hidden files of workers killed mid-write (in the last attempt) from the driver's directory.

    ``finalize``: the status of a run that failed or was interrupted. Its sink's loggers first write out the
    rows they hold (after a good run rank 0 finalizes them; here it is gone).
    """
    import ray

    try:
        if finalize is not None:
            ray.get(sink.finalize.remote(finalize), timeout=30)
        ray.get(sink.remove_unfinished.remote(), timeout=30)
    except ray.exceptions.RayError:  # its own errors and the timeout
        pass  # best effort, on the way out of a run that may have failed for this very reason


class ResourceError(RuntimeError):
    """The cluster cannot place the requested workers (within ``resource_wait_s``)."""


def _worker_shape(settings: RayRunSettings) -> dict[str, float]:
    shape = dict(settings.resources_per_worker or {})
    shape.setdefault("CPU", 1.0)
    if settings.use_gpu:
        shape.setdefault("GPU", 1.0)
    return {k: v for k, v in shape.items() if v > 0}


def _placeable(shape: dict[str, float], nodes: list[dict[str, float]], strategy: str) -> int:
    """How many workers of ``shape`` the nodes' total resources could hold under the placement strategy."""
    per_node = [min(int(node.get(k, 0.0) // v) for k, v in shape.items()) for node in nodes]
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    return sum(per_node)


def _wait_for_room(settings: RayRunSettings) -> None:
    """Fail with a readable error, within ``resource_wait_s``, when the workers can never be placed.

    Counts against the nodes' total resources (not what is free right now): a busy cluster frees up,
    so only a cluster too small for the request fails, after the wait. Meanwhile the request is handed
    to the autoscaler (``ray.autoscaler.sdk.request_resources``), so a cluster that scales from zero
    gets its nodes; give it a ``resource_wait_s`` as long as a node takes to boot.
    """
    import ray

    from ray.autoscaler.sdk import request_resources

    shape = _worker_shape(settings)
    deadline = time.monotonic() + settings.resource_wait_s
    requested = False
    try:
        while True:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            fits = _placeable(shape, nodes, settings.placement_strategy)
            if fits >= settings.num_workers:
                return
            if not requested:
                # Tell an autoscaler (if the cluster has one) what the run needs, so it can add nodes.
                request_resources(bundles=[shape] * settings.num_workers)
                requested = True
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        if requested:
            request_resources(bundles=[])  # Ray Train's placement group carries the demand from here on
    totals: dict[str, float] = {}
    for node in nodes:
        for key in shape:
            totals[key] = totals.get(key, 0.0) + node.get(key, 0.0)
    have = ", ".join(f"{k}={v:g}" for k, v in sorted(totals.items()))
    raise ResourceError(
        f"the Ray cluster cannot place num_workers={settings.num_workers} workers of {shape} each "
        f"(placement_strategy={settings.placement_strategy!r}): its {len(nodes)} node(s) have {have} in all, "
        f"room for {fits}. Waited {settings.resource_wait_s:g} s for more nodes (resource_wait_s). Lower "
        "num_workers or resources_per_worker, or add nodes to the cluster"
    )


class _ProgressPump:
    """Hands the workers' progress updates from the sink actor to the driver's progress bar, on a thread."""

    def __init__(self, sink: Any, on_progress: Callable[[Any], None]):
        self._sink = sink
        self._on_progress = on_progress
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raylight-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        while True:
            stopping = self._stopping.wait(POLL_SECONDS)
            try:
                updates = ray.get(self._sink.take_progress.remote())
            except ray.exceptions.RayError:
                return  # the sink is gone: the run ended
            for update in updates:
                self._on_progress(update)
            if stopping:
                return

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)


def _interruptible(torch_trainer: type) -> type:
    """``TorchTrainer`` whose Ctrl-C stops the run on the cluster and raises ``KeyboardInterrupt`` here.

    Ray Train's own handler aborts the run and then exits the whole process; a library must leave that
    to its caller. Ours asks the controller to abort (it tears the workers down), waits for that, puts
    the previous handler back and raises ``KeyboardInterrupt``, so the Trainer records the run as
    interrupted and the caller's ``except``/``finally`` blocks run.
    """
    import ray

    class InterruptibleTorchTrainer(torch_trainer):
        _previous_sigint: Any = None

        def _register_sigint_handler(self, controller) -> None:
            previous = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts the wait below
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_SECONDS)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # the controller exits as it aborts
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)
            self._previous_sigint = previous

        def fit(self):
            try:
                return super().fit()
            finally:
                if self._previous_sigint is not None:
                    signal.signal(signal.SIGINT, self._previous_sigint)

    return InterruptibleTorchTrainer
