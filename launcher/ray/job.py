"""The job the driver ships to the workers, serialised once with cloudpickle.

Classes defined in the user's script (``__main__``) or in modules the
workers cannot import (files outside site-packages, e.g. the project the
script lives in) are pickled by value. Anything that cannot be pickled at
all fails here, on the driver, with the attribute path that holds it.
"""

from __future__ import annotations

import io
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from runtime.config import RunConfig
from runtime.seed import SEED_ENV, SEED_WORKERS_ENV, capture_rng_state

LARGE_JOB_BYTES = 64 * 1024 * 1024
# Set to 1 on the driver: workers stream checkpoints through Ray even where they see the run directory.
STREAM_FILES_ENV = "RAYLIGHT_STREAM_FILES"
# Set to 0 on the driver or on a worker's node: workers keep glibc's own malloc settings (worker.tune_allocator).
TUNE_MALLOC_ENV = "RAYLIGHT_TUNE_MALLOC"


@dataclass
class Job:
    stage: str  # "fit", "validate", "test", "predict"
    module: Any
    config: RunConfig
    callbacks: list[Any] = field(default_factory=list)
    datamodule: Any = None
    train_dataloaders: Any = None
    val_dataloaders: Any = None
    dataloaders: Any = None  # validate / test / predict
    return_predictions: bool = True  # predict: False keeps none (a prediction writer writes them on each rank)
    logger_count: int = 0  # how many loggers the driver has (LearningRateMonitor needs to know there are some)
    progress_bar: bool = True  # whether the driver shows a progress bar (else rank 0 sends no progress)
    # Always stream checkpoints to the driver, even from a worker that sees its run directory (STREAM_FILES_ENV).
    stream_files: bool = False
    # False when the driver was started with RAYLIGHT_TUNE_MALLOC=0 (TUNE_MALLOC_ENV): workers leave malloc alone.
    tune_malloc: bool = True
    # Workers look for a preemption notice about this often (agreed across ranks as a step count).
    preemption_check_seconds: float = 1.0
    # (epoch, global_step, batches_that_stepped) of the fit before validate/test/predict: Engine.continue_from
    initial_progress: tuple[int, int, int] | None = None
    # The driver's seeding at the moment fit/validate/test/predict was called. Every rank starts from it, as
    # every rank of a Lightning DDP script does after the same seed_everything() and model construction.
    seed_environment: dict[str, str] = field(default_factory=dict)
    rng_state: dict[str, Any] | None = None


def driver_seeding() -> tuple[dict[str, str], dict[str, Any]]:
    """``PL_GLOBAL_SEED``/``PL_SEED_WORKERS`` and the CPU generators' state of this process, for the workers.

    Ray workers do not inherit the driver's environment, so without this a
    ``seed_everything()`` in the user's script would not reach them (the
    distributed sampler's shuffle seed and dropout would differ from run to
    run). CUDA generator states stay behind: a worker sees other devices;
    the workers seed CUDA from ``PL_GLOBAL_SEED`` instead.
    """
    environment = {name: os.environ[name] for name in (SEED_ENV, SEED_WORKERS_ENV) if name in os.environ}
    state = capture_rng_state()
    state.pop("torch.cuda", None)
    return environment, state


class UnpicklableJobError(TypeError):
    """Part of the job cannot be sent to the workers."""


def _stdlib_and_site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("stdlib"), paths.get("platstdlib"), paths.get("purelib"), paths.get("platlib")}
    return tuple(os.path.realpath(d) for d in dirs if d)


def _register_user_modules(obj_types: set[type]) -> None:
    """Pickle by value the modules that define the job's classes and are not installed packages."""
    installed = _stdlib_and_site_dirs()
    for cls in obj_types:
        module = sys.modules.get(cls.__module__)
        if module is None or cls.__module__ in ("builtins", "__main__"):
            continue
        if cls.__module__.split(".")[0] in ("runtime", "launcher", "torch", "ray"):
            continue
        path = getattr(module, "__file__", None)
        if path is None:
            continue
        if not os.path.realpath(path).startswith(installed):
            cloudpickle.register_pickle_by_value(module)


def _classes_in(obj: Any, seen: set[int], out: set[type], depth: int = 0) -> None:
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    out.add(type(obj))
    if isinstance(obj, dict):
        for value in obj.values():
            _classes_in(value, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _classes_in(value, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            _classes_in(value, seen, out, depth + 1)


def find_unpicklable(obj: Any, path: str, seen: set[int] | None = None) -> tuple[str, Exception] | None:
    """The deepest attribute path under ``obj`` that cloudpickle cannot serialise, with its error."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return None
    seen.add(id(obj))
    try:
        cloudpickle.dumps(obj)
        return None
    except Exception as err:  # noqa: BLE001 - any pickling failure is what we look for
        error = err
    children: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        state = vars(obj)
        for holder in ("_modules", "_parameters", "_buffers"):  # nn.Module keeps children here
            for name, value in (state.get(holder) or {}).items():
                children.append((f"{path}.{name}", value))
        children += [(f"{path}.{k}", v) for k, v in state.items() if k not in ("_modules", "_parameters", "_buffers")]
    for child_path, child in children:
        found = find_unpicklable(child, child_path, seen)
        if found is not None:
            return found
    return path, error


def prepare_job(job: Job) -> None:
    """Stamp the driver's seeding on ``job`` and mark the user's own modules to be pickled by value.

    Call before any cloudpickling of the job (``serialize_job`` does).
    """
    job.seed_environment, job.rng_state = driver_seeding()
    classes: set[type] = set()
    _classes_in(job, set(), classes)
    _register_user_modules(classes)


def unpicklable_job_error(job: Job, err: Exception) -> UnpicklableJobError:
    """The error to raise when pickling ``job`` failed with ``err``: names the attribute path that holds the culprit."""
    for name in ("module", "datamodule", "callbacks", "train_dataloaders", "val_dataloaders", "dataloaders"):
        found = find_unpicklable(getattr(job, name), "model" if name == "module" else name)
        if found is not None:
            where, cause = found
            return UnpicklableJobError(
                f"{where} cannot be sent to the Ray workers: {type(cause).__name__}: {cause}. Objects such as "
                "locks, sockets, open files and database connections cannot be pickled; create them in "
                "setup() or in the hook that uses them instead of in __init__"
            )
    return UnpicklableJobError(f"the job cannot be pickled for the Ray workers: {err}")


def serialize_job(job: Job) -> bytes:
    """cloudpickle the job with the driver's seeding; fail with the attribute path of anything that cannot travel."""
    prepare_job(job)
    buffer = io.BytesIO()
    try:
        cloudpickle.dump(job, buffer)
    except Exception as err:  # noqa: BLE001 - any pickling failure is reported with its attribute path
        raise unpicklable_job_error(job, err) from err
    data = buffer.getvalue()
    if len(data) > LARGE_JOB_BYTES:
        warnings.warn(
            f"the serialised job is {len(data) / 2**20:.0f} MiB: something large (often a dataset held in memory) "
            "is captured by value and copied to every worker. Load the data inside the datamodule's setup() or "
            "the *_dataloader() hooks, on the workers, instead of passing tensors from the driver",
            stacklevel=3,
        )
    return data
