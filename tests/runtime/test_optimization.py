"""OptimizerWrapper (what ``self.optimizers()`` returns) outside a running step: copies and missing names."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from runtime.loops.optimization import OptimizerWrapper


def _wrapper() -> OptimizerWrapper:
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.25, momentum=0.9)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers in the state
    return OptimizerWrapper(optimizer, engine=None)


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_a_copied_wrapper_reads_the_copied_optimizer(how):
    wrapper = _wrapper()
    copied = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda w: pickle.loads(pickle.dumps(w)),
    }[how](wrapper)

    # `defaults` is not defined on the wrapper: it is read from the wrapped optimizer.
    assert copied.defaults["lr"] == 0.25 and copied.defaults["momentum"] == 0.9
    original, restored = wrapper.state_dict(), copied.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], state["momentum_buffer"])


def test_a_wrapper_without_an_optimizer_raises_attribute_error():
    # What pickle and copy see while they rebuild a wrapper: the instance exists, `optimizer` is not set yet.
    bare = OptimizerWrapper.__new__(OptimizerWrapper)
    assert not hasattr(bare, "__setstate__")
    with pytest.raises(AttributeError, match="no attribute 'defaults'"):
        bare.defaults
