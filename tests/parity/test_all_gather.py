"""``self.all_gather`` in a single process: Lightning returns the data with no world-size dimension added."""

from __future__ import annotations

import torch

from tests.parity.bodies import Regressor
from tests.parity.harness import run_both


class Gathering(Regressor):
    """Gathers a scalar tensor, a Python number, a matrix and a dict of tensors at each epoch end."""

    def __init__(self) -> None:
        super().__init__()
        self.gathered = []

    def on_train_epoch_end(self):
        self.gathered.append({
            "scalar tensor": self.all_gather(torch.tensor(1.5)),
            "python float": self.all_gather(2.5),
            "matrix": self.all_gather(torch.arange(6.0).reshape(2, 3)),
            "dict": self.all_gather({"a": torch.ones(4), "b": torch.tensor(7.0)}),
        })


def _described(value):
    """Type, shape and values of what all_gather returned, for comparing the two sides."""
    if isinstance(value, dict):
        return {key: _described(item) for key, item in value.items()}
    return (type(value).__name__, tuple(value.shape), value.tolist())


def test_all_gather_in_one_process_keeps_each_shape(tmp_path):
    pl_run, rl_run = run_both(Gathering, tmp_path=tmp_path, trainer_args={"max_epochs": 1})
    expected = [_described(g) for g in pl_run.model.gathered]
    actual = [_described(g) for g in rl_run.model.gathered]
    assert actual == expected
    assert actual == [{
        "scalar tensor": ("Tensor", (), 1.5),
        "python float": ("Tensor", (), 2.5),
        "matrix": ("Tensor", (2, 3), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
        "dict": {"a": ("Tensor", (4,), [1.0, 1.0, 1.0, 1.0]), "b": ("Tensor", (), 7.0)},
    }]
