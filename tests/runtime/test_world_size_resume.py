"""Resuming a 2-rank fit checkpoint on 1 and on 3 gloo ranks.

The saved run trains an IndexRecordingModule (each step records the dataset
indices it got) on 2 ranks with a checkpoint after every step and at every
epoch end. Each checkpoint is then resumed on another world size, and the
test checks which samples the resumed run trained on: a checkpoint from the
middle of an epoch is refused with a message naming both world sizes and the
position (re-sharding the rest of the epoch would repeat or skip samples), and
one saved after the epoch's last batch trains the next epoch on every sample
exactly once.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from runtime import ModelCheckpoint
from tests.runtime import distributed_helpers as h

SAVED_WORLD_SIZE = h.WORLD_SIZE
BATCHES_PER_RANK = {n: math.ceil(math.ceil(h.WS_SAMPLES / n) / h.WS_BATCH) for n in (1, 2, 3)}  # 8, 4, 3
MID_STEP = 2  # epoch 0, after 2 of its 4 batches per rank


def _checkpoints(directory: Path) -> dict[int, tuple[str, dict]]:
    """global_step -> (path, fit loop state) for every checkpoint in ``directory``."""
    found = {}
    for path in sorted(directory.glob("*.ckpt")):
        checkpoint = torch.load(path, weights_only=True)
        found[checkpoint["global_step"]] = (str(path), checkpoint["loops"]["fit_loop"])
    return found


@pytest.fixture(scope="module", params=[False, True], ids=["sequential", "shuffled"])
def saved(request, tmp_path_factory):
    """The 2-rank run: what each rank saw per epoch, and the checkpoints the tests resume from."""
    shuffle = request.param
    out = tmp_path_factory.mktemp(f"saved-shuffle-{shuffle}")
    h.spawn(h.world_size_save_worker, out, str(out), shuffle)
    ranks = h.load_results(out, "ws-save")
    assert [r["batches"] for r in ranks] == [BATCHES_PER_RANK[SAVED_WORLD_SIZE]] * SAVED_WORLD_SIZE
    steps, epochs = _checkpoints(out / "steps"), _checkpoints(out / "epochs")
    last_step = BATCHES_PER_RANK[SAVED_WORLD_SIZE]
    ckpts = {"mid": steps[MID_STEP], "last_batch": steps[last_step], "epoch_end": epochs[last_step]}
    # The checkpoints are what their names say, and they record the world size they were saved with.
    positions = {name: (state["position"], state["batches_done"], state["world_size"]) for name, (_, state) in ckpts.items()}
    assert positions == {
        "mid": ("batch_end", MID_STEP, SAVED_WORLD_SIZE),
        "last_batch": ("batch_end", last_step, SAVED_WORLD_SIZE),
        "epoch_end": ("epoch_end", last_step, SAVED_WORLD_SIZE),
    }
    return {"shuffle": shuffle, "seen": [r["seen"] for r in ranks], "paths": {k: p for k, (p, _) in ckpts.items()}}


@pytest.fixture(scope="module", params=[1, 3], ids=["on-1-rank", "on-3-ranks"])
def resumed(request, saved, tmp_path_factory):
    """Each checkpoint resumed on ``world_size`` ranks: per rank, per checkpoint, what happened."""
    world_size = request.param
    out = tmp_path_factory.mktemp(f"resumed-{world_size}")
    h.spawn(h.world_size_resume_worker, out, str(out), saved["shuffle"], saved["paths"], world_size=world_size)
    return {"world_size": world_size, "dir": out, "ranks": h.load_results(out, "ws-resume", world_size=world_size)}


@pytest.mark.timeout(120)
def test_mid_epoch_checkpoint_on_another_world_size_is_refused(saved, resumed):
    world_size = resumed["world_size"]
    path = saved["paths"]["mid"]
    for rank, result in enumerate(resumed["ranks"]):
        message = result["mid"]["error"]
        assert message is not None, f"rank {rank} resumed a mid-epoch checkpoint on {world_size} ranks"
        assert path in message
        assert (
            f"saved with world size {SAVED_WORLD_SIZE} at batch {MID_STEP} of {BATCHES_PER_RANK[SAVED_WORLD_SIZE]} "
            f"(per rank) of epoch 0, and this run has world size {world_size}"
        ) in message
        assert f"Resume on {SAVED_WORLD_SIZE} workers (num_workers={SAVED_WORLD_SIZE})" in message
        assert "resume from a checkpoint saved at the end of an epoch" in message
    # Refused before training anything: no checkpoint came out of the attempt.
    assert not list((resumed["dir"] / "mid").rglob("*.ckpt"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["last_batch", "epoch_end"])
def test_checkpoint_after_the_epochs_last_batch_resumes_on_another_world_size(saved, resumed, name):
    world_size = resumed["world_size"]
    results = [r[name] for r in resumed["ranks"]]
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    new_batches = BATCHES_PER_RANK[world_size]
    for rank, result in enumerate(results):
        # Epoch 0 was complete: nothing of it is trained again, and epoch 1 is sharded for the new world size.
        assert sorted(result["seen"]) == [1], (rank, sorted(result["seen"]))
        assert result["batches"] == new_batches, rank
        assert result["global_step"] == BATCHES_PER_RANK[SAVED_WORLD_SIZE] + new_batches, rank
        assert result["current_epoch"] == h.WS_EPOCHS, rank
    seen = Counter(index for result in results for index in result["seen"][1])
    assert seen == Counter(range(h.WS_SAMPLES)), f"epoch 1 on {world_size} ranks: {seen}"
    for rank, result in enumerate(results[1:], start=1):
        for key, value in result["weights"].items():
            assert torch.equal(value, results[0]["weights"][key]), f"rank {rank}: {key} differs from rank 0"


def test_checkpoint_without_a_recorded_world_size_still_resumes(tmp_path):
    """Checkpoints written before the world size was recorded resume as before (same world size here)."""
    steps = tmp_path / "steps"
    h.world_size_fit(tmp_path / "full", True, [ModelCheckpoint(dirpath=str(steps), every_n_train_steps=1, save_top_k=-1)])
    path, _ = _checkpoints(steps)[3]
    checkpoint = torch.load(path, weights_only=True)
    for key in ("world_size", "epoch_batches"):
        del checkpoint["loops"]["fit_loop"][key]
    old_path = str(tmp_path / "old-format.ckpt")
    torch.save(checkpoint, old_path)

    new_engine, new_module = h.world_size_fit(tmp_path / "new", True, [], ckpt=path)
    old_engine, old_module = h.world_size_fit(tmp_path / "old", True, [], ckpt=old_path)
    assert old_engine.global_step == new_engine.global_step == h.WS_EPOCHS * BATCHES_PER_RANK[1]
    assert old_module.seen == new_module.seen
    for key, value in new_module.state_dict().items():
        assert torch.equal(old_module.state_dict()[key], value), key
