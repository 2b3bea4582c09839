"""The Engine under a real two-rank gloo process group (torch.multiprocessing.spawn).

Each test spawns two ranks that run the Engine and save what they ended with
(weights, metrics, the samples they saw); the assertions run here, against a
single-process run or against values worked out from Lightning's semantics.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import DistributedSampler

from tests.runtime import distributed_helpers as h

# On a machine with one GPU both gloo ranks share it: NCCL would refuse two ranks on one device, gloo moves
# the CUDA tensors through the host. That still runs the model, DDP's buckets and the logged values on the GPU.
ACCELERATORS = [
    "cpu",
    pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def _assert_same_weights(actual: dict, expected: dict, exact: bool, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        if exact:
            assert torch.equal(actual[key], expected[key]), f"{what}: {key} differs: {actual[key]} vs {expected[key]}"
        else:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5, msg=f"{what}: {key}")


# --------------------------------------------------------------------------- 1
@pytest.mark.timeout(120)
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_ddp_matches_single_process_with_double_batch(tmp_path, accelerator):
    accumulate_values = [1, 2]
    h.spawn(h.equivalence_worker, tmp_path, str(tmp_path), accumulate_values, accelerator)
    ranks = h.load_results(tmp_path, "equivalence")

    for accumulate in accumulate_values:
        expected_weights, expected_step = h.equivalence_fit(
            tmp_path / "single", batch_size=16, accumulate=accumulate, accelerator=accelerator
        )
        batches = h.EQUIVALENCE_SAMPLES // 16
        assert expected_step == h.EQUIVALENCE_EPOCHS * math.ceil(batches / accumulate)
        rank0, rank1 = (r[f"acc{accumulate}"] for r in ranks)
        assert rank0["global_step"] == rank1["global_step"] == expected_step
        _assert_same_weights(rank1["weights"], rank0["weights"], exact=True, what=f"rank 1 vs rank 0, acc={accumulate}")
        _assert_same_weights(rank0["weights"], expected_weights, exact=False, what=f"DDP vs single, acc={accumulate}")
        # The run really trained: weights moved away from the seeded initialisation.
        torch.manual_seed(0)
        initial = h.RegressionModule().state_dict()
        assert not torch.allclose(rank0["weights"]["net.0.weight"], initial["net.0.weight"])


# --------------------------------------------------------------------------- 2
def _rank_batch_sizes(n: int, batch: int, rank: int) -> list[int]:
    per_rank = len(list(DistributedSampler(range(n), num_replicas=h.WORLD_SIZE, rank=rank, shuffle=False)))
    return [min(batch, per_rank - start) for start in range(0, per_rank, batch)]


def _expected_reductions(value_fn, n: int, batch: int) -> dict:
    sizes = [_rank_batch_sizes(n, batch, r) for r in range(h.WORLD_SIZE)]
    values = [[value_fn(r, b) for b in range(len(sizes[r]))] for r in range(h.WORLD_SIZE)]
    last = [values[r][-1] for r in range(h.WORLD_SIZE)]
    flat = [v for vs in values for v in vs]
    weighted = sum(v * s for r in range(h.WORLD_SIZE) for v, s in zip(values[r], sizes[r]))
    return {
        "step": {"mean": sum(last) / len(last), "sum": sum(last), "max": max(last), "min": min(last)},
        "epoch": {"mean": weighted / sum(map(sum, sizes)), "sum": sum(flat), "max": max(flat), "min": min(flat)},
        "local_step": last,
        "local_epoch": [
            sum(v * s for v, s in zip(values[r], sizes[r])) / sum(sizes[r]) for r in range(h.WORLD_SIZE)
        ],
        "per_batch_sum": [sum(values[r][b] for r in range(h.WORLD_SIZE)) for b in range(len(values[0]))],
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_sync_dist_reductions_follow_lightning(tmp_path, accelerator):
    h.spawn(h.reductions_worker, tmp_path, str(tmp_path), accelerator)
    ranks = h.load_results(tmp_path, "reductions")
    train = _expected_reductions(h.train_value, h.REDUCTION_SAMPLES, h.REDUCTION_BATCH)
    val = _expected_reductions(h.val_value, h.REDUCTION_SAMPLES, h.REDUCTION_BATCH)
    # Batches of 3 and 2 on each rank: the batch-size-weighted mean is not the plain mean of the values.
    assert train["epoch"]["mean"] == pytest.approx(6.4)

    for rank, result in enumerate(ranks):
        metrics = result["callback_metrics"]
        for fx in ("mean", "sum", "max", "min"):
            assert metrics[f"t_{fx}_step"] == pytest.approx(train["step"][fx]), (rank, fx)
            assert metrics[f"t_{fx}_epoch"] == pytest.approx(train["epoch"][fx]), (rank, fx)
            assert metrics[f"t_{fx}"] == pytest.approx(train["epoch"][fx]), (rank, fx)
            assert metrics[f"v_{fx}"] == pytest.approx(val["epoch"][fx]), (rank, fx)
        assert metrics["t_local_step"] == pytest.approx(train["local_step"][rank]), rank
        assert metrics["t_local_epoch"] == pytest.approx(train["local_epoch"][rank]), rank
        assert metrics["v_local"] == pytest.approx(val["local_epoch"][rank]), rank

    # Only rank 0 talks to the metrics sink, and its rows carry the reduced values.
    rows0 = [metrics for _, metrics in ranks[0]["rows"]]
    assert ranks[1]["rows"] == []
    assert [row["t_sum_step"] for row in rows0 if "t_sum_step" in row] == pytest.approx(train["per_batch_sum"])
    assert [row["t_sum_epoch"] for row in rows0 if "t_sum_epoch" in row] == pytest.approx([train["epoch"]["sum"]])
    assert [row["v_sum"] for row in rows0 if "v_sum" in row] == pytest.approx([val["epoch"]["sum"]])
    assert [row["v_local"] for row in rows0 if "v_local" in row] == pytest.approx([val["local_epoch"][0]])


@pytest.mark.timeout(120)
def test_sync_dist_uses_one_collective_per_log_boundary(tmp_path):
    h.spawn(h.collective_count_worker, tmp_path, str(tmp_path), [1, 20])
    ranks = h.load_results(tmp_path, "collectives")
    # One gather per training step, one per validation step (both log on_step), one per epoch end of each loop.
    sync_points = h.COUNT_TRAIN_BATCHES + h.COUNT_VAL_BATCHES + 2

    for rank, result in enumerate(ranks):
        many, one = result[20], result[1]
        assert many["gather_packed"] == sync_points, (rank, many)
        assert many["collectives"]["all_gather"] == sync_points, (rank, many)
        # Logging 20 metrics instead of 1 adds no collective of any kind.
        assert many["collectives"] == one["collectives"], (rank, many, one)
        assert many["gather_packed"] == one["gather_packed"], rank
        # ... and the values are still reduced: metric i is i + rank, averaged over two ranks.
        for i in (0, 7, 19):
            assert many["callback_metrics"][f"train_m{i}_epoch"] == pytest.approx(i + 0.5), (rank, i)
            assert many["callback_metrics"][f"train_m{i}_step"] == pytest.approx(i + 0.5), (rank, i)
            assert many["callback_metrics"][f"val_m{i}_epoch"] == pytest.approx(i + 0.5), (rank, i)


@pytest.mark.timeout(120)
def test_sync_dist_step_values_are_reduced_where_they_are_read(tmp_path):
    """Between logger steps no collective runs; readers see each value's last reduction."""
    h.spawn(h.deferred_sync_worker, tmp_path, str(tmp_path))
    ranks = h.load_results(tmp_path, "deferred")
    # Reductions: logger steps (batch 3, 7), the step-scheduled checkpoint (global step 5 = batch 4)
    # and the epoch's last batch (9).
    reduced_at = {3, 4, 7, 9}
    expected_seen, last = [], None
    for batch in range(h.DEFERRED_BATCHES):
        if batch in reduced_at:
            last = 10 * batch + 0.5
        expected_seen.append(last)
    for rank, result in enumerate(ranks):
        assert result["gathers"] == len(reduced_at), (rank, result)
        assert result["seen"] == expected_seen, rank
        # The logger gets the reduced value of the very step it writes, as in Lightning.
        assert result["logged"] == ([(3, 30.5), (7, 70.5)] if rank == 0 else []), rank
        # ModelCheckpoint(every_n_train_steps=5, monitor="m") ranked reduced values: steps 5 and 10.
        assert result["best_score"] == 90.5, rank
        assert result["callback_m"] == 90.5, rank


@pytest.mark.timeout(120)
def test_validation_epoch_end_reads_this_epochs_reduced_values(tmp_path):
    """on_validation_epoch_end reads the epoch's sync_dist values already reduced, as in Lightning, and the step
    values cost one collective before the hook; only a hook that logs sync_dist values itself adds a second."""
    h.spawn(h.epoch_end_reads_worker, tmp_path, str(tmp_path))
    ranks = h.load_results(tmp_path, "epoch_end_reads")
    for rank, result in enumerate(ranks):
        for log_in_hook in (False, True):
            for method, epochs in (("fit", 2), ("validate", 1)):
                seen = result[f"{method}-hook_logs={log_in_hook}"]
                assert len(seen) == epochs, (rank, method)
                for epoch, reads in enumerate(seen):
                    what = (rank, method, log_in_hook, epoch)
                    expected = 100 * epoch + 5.5
                    assert reads["callback"]["v"] == pytest.approx(expected), what
                    assert reads["progress_bar"]["v"] == pytest.approx(expected), what
                    assert reads["callback"]["v_local"] == pytest.approx(100 * epoch + 5 + rank), what
                    assert "hook_m" not in reads["callback"] or epoch > 0, what
                    assert reads["gathers_before_hook"] == 1, what
                    assert reads["gathers"] == 1 + log_in_hook, what
                    assert reads["at_validation_end"]["v"] == pytest.approx(expected), what
                    if log_in_hook:
                        assert reads["at_validation_end"]["hook_m"] == pytest.approx(0.5), what


# --------------------------------------------------------------------------- 3
@pytest.mark.timeout(120)
def test_distributed_sampler_swap_shards_and_reshuffles(tmp_path):
    h.spawn(h.sampler_worker, tmp_path, str(tmp_path))
    ranks = h.load_results(tmp_path, "sampler")
    n = h.SAMPLER_SAMPLES
    per_rank = math.ceil(n / h.WORLD_SIZE)
    padding = per_rank * h.WORLD_SIZE - n
    assert padding == 1

    sharded = [r["distributed=True"] for r in ranks]
    for rank in range(h.WORLD_SIZE):
        assert sharded[rank]["num_training_batches"] == math.ceil(per_rank / h.SAMPLER_BATCH)
        assert sorted(sharded[rank]["seen"]) == list(range(h.SAMPLER_EPOCHS))
    for epoch in range(h.SAMPLER_EPOCHS):
        seen = [sharded[rank]["seen"][epoch] for rank in range(h.WORLD_SIZE)]
        assert [len(s) for s in seen] == [per_rank] * h.WORLD_SIZE, epoch
        counts = Counter(seen[0] + seen[1])
        assert set(counts) == set(range(n)), epoch
        duplicated = {index for index, count in counts.items() if count > 1}
        assert len(duplicated) == padding and max(counts.values()) == 2, (epoch, counts)
        # Disjoint except for the padded sample, which DistributedSampler takes from the front of the permutation.
        assert set(seen[0]) & set(seen[1]) == duplicated, epoch
        assert all(len(set(s)) == len(s) for s in seen), epoch
        for rank in range(h.WORLD_SIZE):
            reference = DistributedSampler(
                range(n), num_replicas=h.WORLD_SIZE, rank=rank, shuffle=True, seed=h.SAMPLER_SEED
            )
            reference.set_epoch(epoch)
            assert seen[rank] == list(reference), (rank, epoch)
    for rank in range(h.WORLD_SIZE):
        orders = [sharded[rank]["seen"][epoch] for epoch in range(h.SAMPLER_EPOCHS)]
        assert all(a != b for a, b in zip(orders, orders[1:])), (rank, orders)

    unsharded = [r["distributed=False"] for r in ranks]
    for rank in range(h.WORLD_SIZE):
        assert unsharded[rank]["num_training_batches"] == math.ceil(n / h.SAMPLER_BATCH)
        orders = [unsharded[rank]["seen"][epoch] for epoch in range(h.SAMPLER_EPOCHS)]
        for epoch, order in enumerate(orders):
            assert sorted(order) == list(range(n)), (rank, epoch)
        assert all(a != b for a, b in zip(orders, orders[1:])), (rank, orders)


# --------------------------------------------------------------------------- 4
@pytest.mark.timeout(120)
def test_resume_mid_epoch_under_ddp_is_exact(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    h.spawn(h.resume_full_worker, tmp_path, str(tmp_path), str(ckpt_dir))
    full = h.load_results(tmp_path, "resume-full")
    batches_per_epoch = h.RESUME_SAMPLES // (h.WORLD_SIZE * h.RESUME_BATCH)
    total_steps = h.RESUME_EPOCHS * batches_per_epoch
    assert full[0]["global_step"] == full[1]["global_step"] == total_steps
    _assert_same_weights(full[1]["weights"], full[0]["weights"], exact=True, what="run A, rank 1 vs rank 0")

    by_step = {}
    for path in sorted(ckpt_dir.glob("*.ckpt")):
        checkpoint = torch.load(path, weights_only=True)
        by_step[checkpoint["global_step"]] = (str(path), checkpoint["epoch"])
    expected_steps = list(range(h.RESUME_EVERY_N_STEPS, total_steps + 1, h.RESUME_EVERY_N_STEPS))
    assert sorted(by_step) == expected_steps, by_step
    mid_epoch = [step for step in expected_steps if step % batches_per_epoch != 0]
    assert mid_epoch == [3, 6, 9]
    assert [by_step[step][1] for step in mid_epoch] == [step // batches_per_epoch for step in mid_epoch]

    paths = [by_step[step][0] for step in mid_epoch]
    h.spawn(h.resume_from_worker, tmp_path, str(tmp_path), paths)
    resumed = h.load_results(tmp_path, "resume-from")
    for rank in range(h.WORLD_SIZE):
        for step, path in zip(mid_epoch, paths):
            result = resumed[rank][path]
            assert result["global_step"] == total_steps, (rank, step)
            _assert_same_weights(
                result["weights"], full[0]["weights"], exact=True, what=f"rank {rank} resumed from step {step}"
            )


# --------------------------------------------------------------------------- 5
@pytest.mark.timeout(120)
def test_predict_returns_each_sample_once_in_dataset_order(tmp_path):
    sizes = [10, 11]  # 10: uneven batches per rank (3 + 2); 11: DistributedSampler pads one sample
    h.spawn(h.predict_worker, tmp_path, str(tmp_path), sizes)
    ranks = h.load_results(tmp_path, "predict")
    for n in sizes:
        idx, x = h.indexed_data(n).tensors
        expected = torch.cat([idx.unsqueeze(1).to(x.dtype), 2 * x], dim=1)
        for rank in range(h.WORLD_SIZE):
            batches = ranks[rank][n]
            assert all(b.ndim == 2 for b in batches), (rank, n)
            got = torch.cat(batches)
            assert got[:, 0].tolist() == list(range(n)), (rank, n)
            torch.testing.assert_close(got, expected, msg=f"rank {rank}, n={n}")


@pytest.mark.timeout(120)
def test_predictions_of_plain_python_values_come_back_in_dataset_order(tmp_path):
    h.spawn(h.plain_predict_worker, tmp_path, str(tmp_path), 11)  # DistributedSampler pads one sample
    for rank, batches in enumerate(h.load_results(tmp_path, "plain-predict")):
        assert [b["ids"] for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]], rank
        assert [label for b in batches for label in b["labels"]] == [f"sample-{i}" for i in range(11)], rank


# --------------------------------------------------------------------------- 6
@pytest.mark.timeout(120)
def test_rank_raising_in_training_step_fails_the_run_without_hanging(tmp_path):
    start = time.monotonic()
    with pytest.raises(ProcessRaisedException) as raised:
        h.spawn(h.failing_worker, tmp_path, str(tmp_path), pg_timeout_s=20)
    elapsed = time.monotonic() - start
    assert elapsed < 90, f"the failed run took {elapsed:.0f}s to end"
    assert raised.value.error_index == h.FAIL_RANK, str(raised.value)
    message = str(raised.value)
    assert f"ValueError: deliberate failure on rank {h.FAIL_RANK} at batch {h.FAIL_BATCH}" in message
    assert "training_step" in message
    assert not list(tmp_path.glob("failing-finished-*")), "a rank finished fit although its peer failed"


@pytest.mark.timeout(120)
def test_manual_optimization_with_two_backward_passes_per_step_under_ddp(tmp_path):
    """A GAN-shaped module (toggle_optimizer, one manual_backward per network) trains under DDP with
    strategy='ddp_find_unused_parameters_true' exactly as one process does on the two ranks' batches together;
    without it, the error says which Trainer argument to pass (Lightning needs the same one)."""
    h.spawn(h.two_network_worker, tmp_path, str(tmp_path))
    rank0, rank1 = h.load_results(tmp_path, "two_network")
    expected, expected_step = h.two_network_fit(tmp_path / "single", batch_size=16, find_unused=False)
    assert rank0["global_step"] == rank1["global_step"] == expected_step == 2 * 2 * (h.TWO_NETWORK_SAMPLES // 16)
    _assert_same_weights(rank1["weights"], rank0["weights"], exact=True, what="rank 1 vs rank 0")
    _assert_same_weights(rank0["weights"], expected, exact=False, what="DDP vs single process")
    torch.manual_seed(0)
    initial = h.TwoNetworkModule().state_dict()
    assert not torch.allclose(rank0["weights"]["gen.weight"], initial["gen.weight"])
    assert not torch.allclose(rank0["weights"]["critic.weight"], initial["critic.weight"])
    for rank in (rank0, rank1):
        assert "Trainer(strategy='ddp_find_unused_parameters_true')" in rank["refused"], rank["refused"]
