"""Strategy.all_gather under two gloo ranks: every rank gets the data of all ranks along a new first dimension.

The single-process shapes (no new dimension, as in Lightning) are compared with Lightning in
tests/parity/test_all_gather.py.
"""

from __future__ import annotations

import pytest
import torch

from runtime.strategy import Strategy
from tests.runtime import distributed_helpers as h


def gather_worker(rank: int, out_dir: str) -> None:
    strategy = Strategy()
    gathered = {
        "scalar": strategy.all_gather(torch.tensor(float(rank))),
        "matrix": strategy.all_gather(torch.full((2, 3), float(rank))),
        "dict": strategy.all_gather({"a": torch.ones(4) * rank}),
    }
    h.save_result(out_dir, "gather", rank, gathered)


@pytest.mark.timeout(120)
def test_all_gather_adds_a_world_size_dimension_across_two_ranks(tmp_path):
    h.spawn(gather_worker, tmp_path, str(tmp_path))
    for rank, gathered in enumerate(h.load_results(tmp_path, "gather")):
        assert torch.equal(gathered["scalar"], torch.tensor([0.0, 1.0])), rank
        assert torch.equal(gathered["matrix"], torch.stack([torch.zeros(2, 3), torch.ones(2, 3)])), rank
        assert torch.equal(gathered["dict"]["a"], torch.stack([torch.zeros(4), torch.ones(4)])), rank
