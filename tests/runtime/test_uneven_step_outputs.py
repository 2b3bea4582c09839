"""training_step returning something unusable on one rank of two, under DDP (gloo).

A rank that returns None would skip backward, so it would never join DDP's
gradient all-reduce and its peer would wait there until the process group
times out. Lightning documents skipping by None as unsupported with several
devices; here that rank raises a typed error naming itself and the step, and
the run ends at once (the peer's all-reduce fails when the rank is gone).
The same holds for a float returned on one rank.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from tests.runtime import distributed_helpers as h

# A hang would show as a process-group timeout (this long), far above a normal run's few seconds.
PG_TIMEOUT_S = 20


def _run_until_it_fails(tmp_path, ranks: list[int], output) -> float:
    start = time.monotonic()
    with pytest.raises(ProcessRaisedException):
        h.spawn(h.skip_worker, tmp_path, str(tmp_path), ranks, output, pg_timeout_s=PG_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert elapsed < PG_TIMEOUT_S, f"the run took {elapsed:.0f}s: a rank waited for the process-group timeout"
    return elapsed


def _record(tmp_path, rank: int) -> dict:
    return torch.load(h.result_path(tmp_path, "skip", rank), weights_only=True)


@pytest.mark.timeout(120)
def test_none_on_one_rank_fails_the_run_naming_the_rank_and_the_step(tmp_path):
    _run_until_it_fails(tmp_path, [1], None)
    result = _record(tmp_path, 1)
    assert result["error"] == "DistributedSkipError", result
    message = result["message"]
    # In epoch 0, the global step before batch k's optimizer step is k.
    assert f"returned None on rank 1 at global_step {h.SKIP_BATCH_IDX} (epoch 0, batch_idx {h.SKIP_BATCH_IDX})" in message
    assert "not supported in a distributed run" in message and "Return a loss on every rank" in message
    assert not h.result_path(tmp_path, "skip", 0).exists(), "rank 0 finished although its peer never joined the step"


@pytest.mark.timeout(120)
def test_none_on_every_rank_is_refused_on_every_rank(tmp_path):
    _run_until_it_fails(tmp_path, [0, 1], None)
    for rank in (0, 1):
        result = _record(tmp_path, rank)
        assert result["error"] == "DistributedSkipError" and f"on rank {rank} at global_step" in result["message"]


@pytest.mark.timeout(120)
def test_float_loss_on_one_rank_fails_the_run_naming_that_rank(tmp_path):
    _run_until_it_fails(tmp_path, [1], 0.25)
    # Rank 1 recorded its error before raising; rank 0 was still waiting for it when the run was torn down.
    result = _record(tmp_path, 1)
    assert result["error"] == "StepOutputError"
    message = result["message"]
    assert "training_step returned float (0.25)" in message
    assert f"rank 1, epoch 0, batch {h.SKIP_BATCH_IDX}" in message
    assert "return a loss tensor" in message
