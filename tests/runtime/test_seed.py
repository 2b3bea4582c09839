"""Global seeding and exact capture/restore of the random generators."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch

from runtime.checkpoint.io import check_weights_only_safe
from runtime.seed import capture_rng_state, restore_rng_state, seed_everything


@pytest.fixture(autouse=True)
def _isolate_global_rng(monkeypatch):
    """Keep the seed env vars and global generators as they were before each test."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        # setenv first so monkeypatch records the original value (or its
        # absence) and puts it back after seed_everything overwrote it.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(before[0])
    np.random.set_state(before[1])
    torch.set_rng_state(before[2])


def draws() -> tuple:
    """A few numbers from every global generator, including the cached-Gaussian paths."""
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        random.getrandbits(64),
        np.random.rand(3).tolist(),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
        torch.randn(2).tolist(),
    )


# ---------------------------------------------------------------------------
# seed_everything
# ---------------------------------------------------------------------------


def test_same_seed_gives_the_same_numbers_everywhere():
    assert seed_everything(1234) == 1234
    first = draws()
    seed_everything(1234)
    assert draws() == first
    seed_everything(4321)
    assert draws() != first


def test_sets_the_environment_for_child_processes():
    seed_everything(7)
    assert os.environ["PL_GLOBAL_SEED"] == "7"
    assert os.environ["PL_SEED_WORKERS"] == "0"
    seed_everything(7, workers=True)
    assert os.environ["PL_SEED_WORKERS"] == "1"


def test_none_reads_the_environment(monkeypatch):
    seed_everything(99)
    expected = draws()
    monkeypatch.setenv("PL_GLOBAL_SEED", " 99 ")

    assert seed_everything() == 99
    assert draws() == expected


def test_none_without_environment_uses_zero_and_warns():
    with pytest.warns(UserWarning, match="no seed"):
        assert seed_everything() == 0
    assert os.environ["PL_GLOBAL_SEED"] == "0"


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_out_of_range_seed_is_a_clear_error(seed):
    with pytest.raises(ValueError, match=rf"seed={seed}\) is out of range.*\[0, 4294967295\]"):
        seed_everything(seed)


@pytest.mark.parametrize("seed", [3.5, "42", True, [1]])
def test_non_integer_seed_is_a_clear_error(seed):
    with pytest.raises(ValueError, match="integer seed"):
        seed_everything(seed)


def test_invalid_environment_seed_names_the_variable(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "abc")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED='abc' is not an integer"):
        seed_everything()


def test_accepts_numpy_integers_and_the_bounds():
    assert seed_everything(np.int64(5)) == 5
    assert seed_everything(0) == 0
    assert seed_everything(2**32 - 1) == 2**32 - 1


# ---------------------------------------------------------------------------
# capture / restore
# ---------------------------------------------------------------------------


def test_restore_replays_exactly_the_same_draws():
    seed_everything(3)
    draws()  # leave every generator mid-stream, Gaussian caches included
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    state = capture_rng_state()
    expected = draws()

    draws()  # move on, as training would
    restore_rng_state(state)

    assert draws() == expected


def test_state_survives_a_weights_only_checkpoint_round_trip(tmp_path):
    seed_everything(11)
    random.gauss(0.0, 1.0)  # a cached Python Gaussian (gauss_next is a float)
    np.random.standard_normal()  # a cached NumPy Gaussian
    state = capture_rng_state()
    expected = draws()
    check_weights_only_safe({"rng_states": state})

    path = tmp_path / "rng.ckpt"
    torch.save({"rng_states": state}, path)
    loaded = torch.load(path, weights_only=True)["rng_states"]
    seed_everything(12)
    restore_rng_state(loaded)

    assert draws() == expected


def test_captured_state_is_compact_and_plain():
    state = capture_rng_state()
    assert set(state) >= {"python", "numpy", "torch"}
    assert state["python"]["state"].dtype == torch.int64
    assert state["numpy"]["keys"].dtype == torch.int64 and state["numpy"]["keys"].numel() == 624
    assert state["torch"].dtype == torch.uint8
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_restore_only_touches_generators_in_the_state():
    seed_everything(5)
    state = capture_rng_state()
    expected_torch = torch.rand(3)
    python_now = random.getstate()

    restore_rng_state({"torch": state["torch"]})

    assert torch.equal(torch.rand(3), expected_torch)
    assert random.getstate() == python_now


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ([1, 2], "expects the dict"),
        ({"python": {"version": 3}}, "'python' is malformed"),
        ({"numpy": {"keys": torch.zeros(3, dtype=torch.int64)}}, "'numpy' is malformed"),
        ({"torch": [1, 2]}, "'torch' must be a uint8 tensor"),
        ({"torch.cuda": "x"}, "'torch.cuda' must be a list"),
    ],
)
def test_malformed_state_is_a_clear_error(state, match):
    with pytest.raises(ValueError, match=match):
        restore_rng_state(state)


# ---------------------------------------------------------------------------
# seed_everything(workers=True): DataLoader worker processes
# ---------------------------------------------------------------------------


class _Draws(torch.utils.data.Dataset):
    """Each sample is what the worker's global generators give: NumPy, Python's random, torch."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([float(np.random.rand()), random.random(), float(torch.rand(1))], dtype=torch.float64)


class _Recorder(__import__("runtime").LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].tolist())  # the first sample of each batch: one per worker and batch
        return self.layer(batch.float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit_drawing_in_workers(tmp_path, workers: bool) -> list[list[float]]:
    from launcher import Trainer

    seed_everything(42, workers=workers, verbose=False)
    model = _Recorder()
    trainer = Trainer(num_workers=0, max_epochs=1, default_root_dir=str(tmp_path), logger=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(_Draws(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    trainer.fit(model, loader)
    return model.seen


def test_workers_true_seeds_each_dataloader_worker_for_its_rank_and_a_rerun_draws_the_same(tmp_path):
    # torch already gives each worker of one process its own numbers; across DDP ranks, though, every rank
    # draws the same base seed, so without the rank in the seed all ranks would draw the same augmentations.
    plain = _fit_drawing_in_workers(tmp_path / "a", workers=False)
    seeded = _fit_drawing_in_workers(tmp_path / "b", workers=True)
    assert seeded != plain, "the workers were seeded by raylight's worker_init_fn"
    assert seeded[0] != seeded[1], "workers 0 and 1 draw different numbers"
    assert _fit_drawing_in_workers(tmp_path / "c", workers=True) == seeded, "a rerun draws the same numbers"


def test_the_worker_seed_depends_on_the_rank():
    from runtime.seed import seed_dataloader_worker

    numbers = []
    for rank in (0, 1):
        torch.manual_seed(1000 + 1)  # what torch gives worker 1 of a loader whose base seed is 1000
        seed_dataloader_worker(1, rank=rank)
        numbers.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert all(a != b for a, b in zip(*numbers)), numbers
