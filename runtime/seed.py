"""Global random seeds, and saving/restoring the generators for exact resume.

``seed_everything`` is the Lightning-compatible entry point users call at the
top of a script. ``capture_rng_state``/``restore_rng_state`` snapshot every
global generator a training step may draw from (Python ``random``, NumPy's
global ``RandomState``, torch CPU and CUDA) so that a run resumed from a
checkpoint draws exactly the numbers the uninterrupted run would have drawn.
The snapshot holds only tensors, numbers, strings and lists, so it can go
into a checkpoint that loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import random
import warnings
from typing import Any

import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_dataloader_worker", "seed_everything"]

log = logging.getLogger(__name__)

# NumPy's legacy seeding accepts exactly the uint32 range; the same bounds
# apply to every generator so one seed means the same thing everywhere.
MIN_SEED = 0
MAX_SEED = 2**32 - 1

SEED_ENV = "PL_GLOBAL_SEED"
SEED_WORKERS_ENV = "PL_SEED_WORKERS"


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python's ``random``, NumPy (if installed) and torch (CPU and all GPUs).

    Call it once at the top of a script, before building the model, so that
    weight initialisation and data shuffling are reproducible. It also sets
    ``PL_GLOBAL_SEED`` (so processes started later, such as Ray workers,
    seed themselves identically) and ``PL_SEED_WORKERS`` to ``1`` or ``0``
    (so DataLoader workers are given distinct, derived seeds when
    ``workers=True``).

    Args:
        seed: An integer in ``[0, 2**32 - 1]``. If ``None``, the value of the
            ``PL_GLOBAL_SEED`` environment variable is used; if that is unset
            too, the seed is 0 (as in Lightning, so every process and every
            rank agrees on it) and a warning says so.
        workers: Also derive distinct seeds for DataLoader worker processes.
        verbose: Log the seed at INFO level.

    Returns:
        The seed that was applied.

    Raises:
        ValueError: if the seed (or ``PL_GLOBAL_SEED``) is not an integer in range.
    """
    if seed is None:
        env_seed = os.environ.get(SEED_ENV)
        if env_seed is None:
            seed = 0
            warnings.warn(
                f"seed_everything() got no seed and {SEED_ENV} is not set; using seed 0. "
                "Pass a seed, e.g. seed_everything(42), to choose one.",
                stacklevel=2,
            )
        else:
            try:
                seed = int(env_seed.strip())
            except ValueError:
                raise ValueError(
                    f"the environment variable {SEED_ENV}={env_seed!r} is not an integer; "
                    f"set it to a whole number in [{MIN_SEED}, {MAX_SEED}] or unset it"
                ) from None
    else:
        seed = _as_int(seed)
    if not MIN_SEED <= seed <= MAX_SEED:
        raise ValueError(
            f"seed_everything(seed={seed}) is out of range: seeds must be in "
            f"[{MIN_SEED}, {MAX_SEED}] (NumPy accepts only unsigned 32-bit seeds); "
            f"use e.g. seed % {MAX_SEED + 1}"
        )

    if verbose:
        log.info("Seed set to %d", seed)
    # Environment first: anything started from here on inherits the seed.
    os.environ[SEED_ENV] = str(seed)
    os.environ[SEED_WORKERS_ENV] = "1" if workers else "0"
    _seed_generators(seed)
    return seed


def _seed_generators(seed: int) -> None:
    """Python's ``random``, NumPy's global generator (where NumPy is installed) and torch's."""
    random.seed(seed)
    np = _numpy_or_none()
    if np is not None:
        np.random.seed(seed)
    # torch.manual_seed also seeds every CUDA device (lazily, so it does not
    # initialise CUDA in a process that never uses it).
    torch.manual_seed(seed)


def seeds_workers() -> bool:
    """Whether ``seed_everything(workers=True)`` asked for DataLoader workers to be seeded (in this process or
    the driver that started it: the variable travels to Ray workers with the job's seeding)."""
    return os.environ.get(SEED_WORKERS_ENV) == "1"


def seed_dataloader_worker(worker_id: int, rank: int = 0) -> None:
    """The ``worker_init_fn`` given to DataLoaders after ``seed_everything(workers=True)``.

    Seeds torch, Python's ``random`` and NumPy in each worker process from the loader's base seed (drawn
    from the seeded generator when its iterator starts), the worker's id and the rank. torch alone seeds
    each worker from the base seed and its id, and every DDP rank draws the same base seed, so without the
    rank the ranks' workers would draw the same augmentations; a rerun with the same seed draws the same.
    """
    base = torch.initial_seed() - worker_id  # torch starts worker i from base + i
    digest = hashlib.sha256(f"{base}:{worker_id}:{rank}".encode()).digest()
    _seed_generators(int.from_bytes(digest[:8], "little") % (MAX_SEED + 1))


def _as_int(seed: Any) -> int:
    if isinstance(seed, bool):
        raise ValueError(f"seed_everything(seed={seed!r}) needs an integer seed, not a bool")
    try:
        # operator.index accepts int and NumPy integers but not 3.7 or "3".
        return operator.index(seed)
    except TypeError:
        raise ValueError(
            f"seed_everything(seed={seed!r}) needs an integer seed, got {type(seed).__name__}; "
            f"pass a whole number in [{MIN_SEED}, {MAX_SEED}]"
        ) from None


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global random generators, for a checkpoint.

    Captures Python's ``random``, NumPy's global ``RandomState`` (if NumPy is
    installed), torch's CPU generator and, if CUDA has been initialised in
    this process, every CUDA device's generator. The result contains only
    tensors, ints, floats, strings, ``None`` and lists, so it survives
    ``torch.save`` + ``torch.load(weights_only=True)`` unchanged.

    Returns:
        A dict for :func:`restore_rng_state`, with keys ``"python"``,
        ``"torch"``, and ``"numpy"``/``"torch.cuda"`` when available.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        # The Mersenne Twister words are < 2**32 and the position is <= 624,
        # so int64 holds them exactly and far more compactly than a list.
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "torch": torch.get_rng_state(),
    }
    np = _numpy_or_none()
    if np is not None:
        # legacy=True always gives the MT19937 tuple: the global RandomState
        # cannot hold any other bit generator.
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    # Only when already initialised: get_rng_state_all() would otherwise
    # initialise CUDA as a side effect, which breaks a later fork.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch.cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put the global random generators back where :func:`capture_rng_state` found them.

    Only the generators present in ``state`` are restored. CUDA states are
    restored for as many devices as both the snapshot and this process have;
    on a machine without CUDA they are skipped, because a CPU-only resume has
    no CUDA generator to restore.

    Args:
        state: A dict returned by :func:`capture_rng_state`, possibly after a
            ``torch.save``/``torch.load`` round trip.

    Raises:
        ValueError: if an entry is malformed, naming the entry.
    """
    if not isinstance(state, dict):
        raise ValueError(
            f"restore_rng_state() expects the dict returned by capture_rng_state(), "
            f"got {type(state).__name__}"
        )
    if "python" in state:
        _restore_python(state["python"])
    if "numpy" in state:
        _restore_numpy(state["numpy"])
    if "torch" in state:
        _restore_torch(state["torch"])
    if "torch.cuda" in state:
        _restore_cuda(state["torch.cuda"])


def _restore_python(entry: Any) -> None:
    try:
        internal = tuple(int(word) for word in entry["state"].tolist())
        random.setstate((int(entry["version"]), internal, entry["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"rng state entry 'python' is malformed ({exc}); it must come from capture_rng_state()"
        ) from None


def _restore_numpy(entry: Any) -> None:
    np = _numpy_or_none()
    if np is None:
        # Nothing in this process can draw from NumPy, so nothing to restore;
        # say so, since the run that wrote the checkpoint did have NumPy.
        warnings.warn(
            "the checkpoint holds a NumPy random state but NumPy is not installed here; "
            "install numpy for an exact resume of code that draws from numpy.random",
            stacklevel=3,
        )
        return
    try:
        keys = entry["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (entry["bit_generator"], keys, int(entry["pos"]), int(entry["has_gauss"]), float(entry["cached_gaussian"]))
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"rng state entry 'numpy' is malformed ({exc}); it must come from capture_rng_state()"
        ) from None


def _restore_torch(entry: Any) -> None:
    if not isinstance(entry, torch.Tensor):
        raise ValueError(
            f"rng state entry 'torch' must be a uint8 tensor from capture_rng_state(), got {type(entry).__name__}"
        )
    # The generator state must be a CPU byte tensor even when the checkpoint
    # was loaded with map_location="cuda".
    torch.set_rng_state(entry.to(device="cpu", dtype=torch.uint8))


def _restore_cuda(entries: Any) -> None:
    if not isinstance(entries, (list, tuple)):
        raise ValueError(
            f"rng state entry 'torch.cuda' must be a list of uint8 tensors, got {type(entries).__name__}"
        )
    if not entries or not torch.cuda.is_available():
        return
    for device, entry in enumerate(entries[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(entry.to(device="cpu", dtype=torch.uint8), device)


def _numpy_or_none():
    try:
        import numpy
    except ImportError:
        return None
    return numpy
