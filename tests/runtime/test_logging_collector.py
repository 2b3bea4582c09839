"""runtime/logging/collector.py: batch-size inference, torchmetrics kept optional, Metrics across two gloo ranks.

The two-rank test follows tests/runtime/test_distributed.py: each rank runs the
Engine and saves what it ended with; the assertions run here, against values
worked out from Lightning's semantics (a logged Metric's epoch value is its
``compute()``, which syncs its states over the default process group).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from runtime import LightningModule
from runtime.engine import Engine
from runtime.errors import MisconfigurationError
from runtime.logging.collector import extract_batch_size
from tests.runtime import distributed_helpers as h

torchmetrics = pytest.importorskip("torchmetrics")
lightning_data = pytest.importorskip("lightning.pytorch.utilities.data")

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- batch sizes
@dataclasses.dataclass
class _Batch:
    ids: list
    x: torch.Tensor


BATCHES = {
    "tensor": torch.zeros(5, 3),
    "scalar tensor": torch.tensor(2.0),
    "strings first": (["ab", "cd", "ef"], torch.zeros(3, 2), torch.zeros(3)),
    "one string first": ("a long string", torch.zeros(3, 2)),
    "dict, strings first": {"text": ["abcd"] * 2, "x": torch.zeros(2, 4)},
    "nested": [{"meta": {"name": "x" * 9}, "pair": (torch.zeros(6), torch.zeros(6))}],
    "dataclass": _Batch(["a", "b"], torch.zeros(2, 7)),
    "bytes first": (b"abcdefg", torch.zeros(4)),
    "numpy array first": (np.zeros((3, 5)), torch.zeros(4)),
    "numbers first": ([1.0, 2.0, 3.0], torch.zeros(2)),
    "empty tensor": torch.zeros(0, 3),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_extract_batch_size_follows_lightning(name):
    batch = BATCHES[name]
    assert extract_batch_size(batch) == lightning_data.extract_batch_size(batch)


def test_extract_batch_size_skips_strings():
    assert extract_batch_size((["ab", "cd", "ef"], torch.zeros(3, 2))) == 3
    assert extract_batch_size({"text": ["abcd", "efgh"], "x": torch.zeros(2, 4)}) == 2


@pytest.mark.parametrize("batch", [["a", "b"], {"text": "abc", "n": 3}, [1.0, 2.0]])
def test_extract_batch_size_without_a_tensor_says_how_to_pass_it(batch):
    with pytest.raises(MisconfigurationError, match=r"holds no tensor; pass it as self\.log\(\.\.\., batch_size=N\)"):
        extract_batch_size(batch)
    with pytest.raises(Exception, match="could not infer the batch_size"):
        lightning_data.extract_batch_size(batch)


def test_extract_batch_size_warns_when_tensors_disagree():
    with pytest.warns(UserWarning, match="ambiguous: the batch's first tensor has 4 rows, a later one 3; 4 is used"):
        assert extract_batch_size((torch.zeros(4), torch.zeros(3))) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extract_batch_size((torch.zeros(4), torch.zeros(4, 2), ["a"] * 4)) == 4


# --------------------------------------------------------------------------- torchmetrics stays optional
def test_runtime_logs_without_importing_torchmetrics(tmp_path):
    # A fit that logs tensors, numbers and a dict never imports torchmetrics (it is not a dependency).
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from runtime import LightningModule
        from runtime.config import RunConfig
        from runtime.engine import Engine

        class M(LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(2, 1)
            def training_step(self, batch, batch_idx):
                loss = self.layer(batch[0]).pow(2).mean()
                self.log("loss", loss, on_epoch=True)
                self.log("n", batch_idx)
                self.log_dict({{"a": 1.0, "b": loss.detach()}})
                return loss
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        engine = Engine(RunConfig(max_epochs=1, enable_checkpointing=False, default_root_dir={str(tmp_path)!r}))
        engine.fit(M(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=3))
        assert sorted(engine.callback_metrics) == ["a", "b", "loss", "loss_epoch", "loss_step", "n"]
        print("torchmetrics imported:", "torchmetrics" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torchmetrics imported: False" in done.stdout


# --------------------------------------------------------------------------- Metrics on two gloo ranks
METRIC_SAMPLES = 10  # 5 per rank: batches of 3 and 2
METRIC_BATCH = 3


class MetricModule(LightningModule):
    """Feeds the samples' dataset indices into Metrics: each rank sees only its own indices."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.train_sum = torchmetrics.SumMetric()
        self.val_mean = torchmetrics.MeanMetric()
        self.step_values: list[float] = []

    def training_step(self, batch, batch_idx):
        idx, x = batch
        self.train_sum(idx.float())
        self.log("idx_sum", self.train_sum, on_step=True, on_epoch=True)
        return self.layer(x).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.step_values.append(float(self.trainer.callback_metrics["idx_sum_step"]))

    def validation_step(self, batch, batch_idx):
        idx, x = batch
        self.val_mean(idx.float())
        self.log("idx_mean", self.val_mean, sync_dist=True)  # sync_dist does not apply: compute() syncs

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def metric_worker(rank: int, out_dir: str) -> None:
    sink = h.RecordingSink()
    engine = Engine(h.quiet_config(out_dir, max_epochs=2), metrics_sink=sink)
    module = MetricModule()
    data = h.indexed_data(METRIC_SAMPLES)
    engine.fit(
        module,
        DataLoader(data, batch_size=METRIC_BATCH, shuffle=False),
        DataLoader(data, batch_size=METRIC_BATCH, shuffle=False),
    )
    h.save_result(
        out_dir,
        "metrics",
        rank,
        {
            "callback_metrics": h.floats(engine.callback_metrics),
            "rows": sink.rows,
            "step_values": module.step_values,
            "update_counts": [module.train_sum.update_count, module.val_mean.update_count],
        },
    )


@pytest.mark.timeout(120)
def test_metric_epoch_values_are_computed_over_both_ranks(tmp_path):
    h.spawn(metric_worker, tmp_path, str(tmp_path))
    ranks = h.load_results(tmp_path, "metrics")
    indices = range(METRIC_SAMPLES)
    # DistributedSampler without shuffling: rank r gets indices r, r + 2, ...; batches of 3 and 2.
    local = [[i for i in indices if i % h.WORLD_SIZE == r] for r in range(h.WORLD_SIZE)]
    for rank, result in enumerate(ranks):
        metrics = result["callback_metrics"]
        # Epoch values: over every rank's samples, the same on both ranks (a rank's own would be 20 and 25, 4 and 5).
        assert metrics["idx_sum_epoch"] == metrics["idx_sum"] == sum(indices), f"rank {rank}"
        assert metrics["idx_mean"] == pytest.approx(sum(indices) / METRIC_SAMPLES), f"rank {rank}"
        # Step values: the forward() value, this rank's batch alone (not synced, as in Lightning).
        batch_sums = [sum(local[rank][:METRIC_BATCH]), sum(local[rank][METRIC_BATCH:])]
        assert result["step_values"] == batch_sums * 2, f"rank {rank}"
        assert result["update_counts"] == [0, 0], f"rank {rank}: the Metrics were not reset"
    epoch_rows = [row for _, row in ranks[0]["rows"] if "idx_sum_epoch" in row or "idx_mean" in row]
    assert [row.get("idx_sum_epoch", row.get("idx_mean")) for row in epoch_rows] == [4.5, 45.0, 4.5, 45.0]


# --------------------------------------------------------------------------- one name, two hooks
def _log(collector, fx, name, value, **options):
    collector.current_fx = fx
    args = dict(prog_bar=False, logger=True, on_step=None, on_epoch=None, reduce_fx="mean", enable_graph=False,
                sync_dist=False, add_dataloader_idx=True, batch_size=1, rank_zero_only=False)
    collector.log(name, torch.tensor(value), **{**args, **options})


def test_one_name_from_two_hooks_keeps_two_sets_of_values_through_a_checkpoint():
    from runtime.logging.collector import MetricCollector

    collector = MetricCollector(None, training=True)
    collector.new_batch(torch.zeros(1))
    for value in (1.0, 3.0):
        _log(collector, "training_step", "acc", value, on_epoch=True)
    _log(collector, "on_train_batch_end", "acc", 10.0, on_epoch=True)
    restored = MetricCollector(None, training=True)
    restored.load_state_dict(collector.state_dict())
    restored.compute_epoch()
    callback, _, _ = restored.epoch_metrics()
    assert float(callback["acc_epoch"]) == 10.0, "the hook that logged it last is read, as in Lightning"
    assert {fx for fx, _ in restored.entries} == {"training_step", "on_train_batch_end"}
    assert [e.weight for e in restored.entries.values()] == [2.0, 1.0]


def test_one_name_with_other_options_in_the_same_hook_is_refused_naming_the_hook():
    from runtime.logging.collector import MetricCollector

    collector = MetricCollector(None, training=True)
    collector.new_batch(torch.zeros(1))
    _log(collector, "training_step", "acc", 1.0)
    with pytest.raises(MisconfigurationError, match=r"self.log\('acc'\) was called with different options in "
                                                    r"training_step"):
        _log(collector, "training_step", "acc", 1.0, on_epoch=True)
