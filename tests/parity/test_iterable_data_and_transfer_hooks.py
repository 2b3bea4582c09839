"""A training loader without a length, and the datamodule's batch-transfer hooks.

Without a length the loop knows that a batch is the epoch's last only by fetching one batch ahead, as
Lightning's fetcher does; what hangs on knowing it: validation at the epoch's end, epoch-interval schedulers,
the step on the last partial accumulation window, ``trainer.is_last_batch``. The probe records each training
batch with ``is_last_batch``, each validation, and each epoch's end with the learning rate.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, Sampler

from tests.parity.bodies import Regressor
from tests.parity.harness import (
    PL,
    RL,
    Run,
    as_float,
    assert_fit_parity,
    assert_same_sequence,
    assert_same_weights,
    build_pair,
    loader,
    module_class,
    regression_dataset,
    run_both,
)


# ------------------------------------------------------------------------ loaders without a length
class Rows(IterableDataset):
    """``regression_dataset(n)`` one sample at a time, every ``step``-th from ``start`` (a rank's shard)."""

    def __init__(self, n: int = 22, start: int = 0, step: int = 1, stop: int | None = None) -> None:
        self.n, self.start, self.step, self.stop = n, start, step, stop

    def __iter__(self):
        data = regression_dataset(self.n)
        for i in range(self.start, self.n if self.stop is None else self.stop, self.step):
            yield data[i]


class Batches:
    """An iterable of batches whose ``len()`` raises (not a DataLoader)."""

    def __init__(self, n: int) -> None:
        self.loader = loader(n=n)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        raise TypeError("this iterable has no length")


class InOrder(Sampler):
    """A map-style sampler without ``__len__``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def unsized_loader(kind: str, n: int):
    if kind == "iterable_dataset":
        return DataLoader(Rows(n), batch_size=4)
    if kind == "len_raises":
        return Batches(n)
    return DataLoader(regression_dataset(n), batch_size=4, sampler=InOrder(n))


class Probe(Regressor):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(dropout)
        self.events: list[tuple] = []

    def training_step(self, batch, batch_idx):
        trainer = self.trainer
        self.events.append(("train", self.current_epoch, batch_idx, self.global_step, trainer.is_last_batch))
        x, y = batch
        loss = F.mse_loss(self.net(self.drop(x)), y)
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            self.events.append(("val", self.current_epoch, self.global_step))

    def on_train_epoch_end(self):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.events.append(("epoch_end", self.current_epoch, self.global_step, self.trainer.is_last_batch, lr))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def _assert_same_rows(pl_rows, rl_rows) -> None:
    assert [step for step, _ in rl_rows] == [step for step, _ in pl_rows], (pl_rows, rl_rows)
    for (_, expected), (_, actual) in zip(pl_rows, rl_rows):
        assert sorted(expected) == sorted(actual), (expected, actual)
        assert all(abs(expected[k] - actual[k]) <= 1e-6 for k in expected), (expected, actual)


def _fit_both(tmp_path, kind: str, n: int, **trainer_args):
    pl_run, rl_run = run_both(
        Probe,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": unsized_loader(kind, n), "val_dataloaders": loader(n=10, seed=99)},
        trainer_args=dict(max_epochs=3, num_sanity_val_steps=0, **trainer_args),
        with_logger=True,
    )
    assert_same_sequence(pl_run.model.events, rl_run.model.events, "training events")
    assert_fit_parity(pl_run, rl_run, logged=True)
    _assert_same_rows(pl_run.logger.rows, rl_run.logger.rows)
    return pl_run, rl_run


@pytest.mark.parametrize("kind", ["iterable_dataset", "len_raises", "sampler_without_len"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_unsized_loader_ends_its_epochs_as_lightning_does(tmp_path, kind, accumulate):
    # 18 samples: 5 batches, so with accumulate=2 the last window holds one batch and must still step.
    pl_run, rl_run = _fit_both(tmp_path, kind, 18, accumulate_grad_batches=accumulate)
    assert rl_run.trainer.global_step == 3 * (5 if accumulate == 1 else 3)
    assert [e[1] for e in rl_run.model.events if e[0] == "val"] == [0, 1, 2]
    assert rl_run.trainer.num_training_batches == pl_run.trainer.num_training_batches == float("inf")


@pytest.mark.parametrize(
    "trainer_args",
    [dict(val_check_interval=2), dict(val_check_interval=4, check_val_every_n_epoch=None), dict(max_steps=8)],
    ids=["interval-2", "interval-4-across-epochs", "max-steps-mid-epoch"],
)
def test_unsized_loader_with_val_check_interval_and_max_steps(tmp_path, trainer_args):
    _fit_both(tmp_path, "iterable_dataset", 22, **trainer_args)


def test_empty_unsized_loader_trains_nothing(tmp_path):
    pl_run, rl_run = _fit_both(tmp_path, "iterable_dataset", 0)
    assert rl_run.trainer.global_step == 0


class SaveEveryBatch:
    """Saves ``<epoch>-<batch_idx>.ckpt`` from on_train_batch_end, before the batch's validation (if any)."""

    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.save_checkpoint(str(self.directory / f"{trainer.current_epoch}-{batch_idx}.ckpt"))


def _resumable_fit(tmp_path, name: str, ckpt_path=None):
    torch.manual_seed(3)
    model = module_class(Probe, RL)(dropout=0.2)
    save = type("SaveEveryBatch_raylight", (SaveEveryBatch, RL.Callback), {})(tmp_path / name)
    (tmp_path / name).mkdir(exist_ok=True)
    trainer = RL.trainer(
        str(tmp_path / name), max_epochs=3, num_sanity_val_steps=0, accumulate_grad_batches=2, callbacks=[save]
    )
    torch.manual_seed(4)
    trainer.fit(model, unsized_loader("iterable_dataset", 18), loader(n=10, seed=99), ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize(
    "epoch, batch_idx, step", [(0, 1, 1), (0, 4, 3), (1, 3, 5), (1, 4, 6)],
    ids=["mid-epoch", "epoch-last-batch", "2nd-epoch", "2nd-epoch-last-batch"],
)
def test_unsized_loader_resumes_mid_epoch_exactly(tmp_path, epoch, batch_idx, step):
    # 5 batches per epoch in windows of 2, 2, 1 (checkpoints inside a window cannot resume exactly, as in
    # Lightning: the gradients accumulated so far are not saved). An epoch's last batch is saved before its
    # validation, which the resumed run must then run.
    reference, ref_model = _resumable_fit(tmp_path, "reference")
    ckpt = tmp_path / "reference" / f"{epoch}-{batch_idx}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == step
    resumed, model = _resumable_fit(tmp_path, "resumed", ckpt)
    assert_same_weights(ref_model, model, atol=0)
    assert resumed.global_step == reference.global_step
    assert as_float(resumed.callback_metrics["val_loss"]) == as_float(reference.callback_metrics["val_loss"])
    later = [e for e in ref_model.events if e[0] == "val" and e[2] >= step]
    assert [e for e in model.events if e[0] == "val"] == later


# ------------------------------------------------------------------------- batch-transfer hooks
CALLS: list[str] = []


def _recording_hooks(owner: str):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        CALLS.append(f"{owner}.on_before_batch_transfer:{dataloader_idx}")
        return [batch[0] * 2, *batch[1:]]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        CALLS.append(f"{owner}.transfer_batch_to_device:{device.type}:{dataloader_idx}")
        return [t.to(device) for t in batch]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        CALLS.append(f"{owner}.on_after_batch_transfer:{dataloader_idx}")
        return [batch[0] + 1, *batch[1:]]

    return {
        "on_before_batch_transfer": on_before_batch_transfer,
        "transfer_batch_to_device": transfer_batch_to_device,
        "on_after_batch_transfer": on_after_batch_transfer,
    }


class Data:
    def train_dataloader(self):
        return loader(n=14)

    def val_dataloader(self):
        return loader(n=6, seed=99)

    def predict_dataloader(self):
        return [loader(n=6, seed=97), loader(n=5, seed=96)]


_ALL = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
OVERRIDES = {  # (the module's overrides, the datamodule's)
    "datamodule": ((), _ALL),
    "both": (_ALL, _ALL),
    "mixed": (
        ("on_before_batch_transfer", "on_after_batch_transfer"),
        ("transfer_batch_to_device", "on_after_batch_transfer"),
    ),
    "module-with-datamodule": (_ALL, ()),
}


def _with_hooks(body: type, owner: str, names) -> type:
    hooks = _recording_hooks(owner)
    return type(f"{body.__name__}_{owner}_{'_'.join(names) or 'none'}", (body,), {n: hooks[n] for n in names})


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_datamodule_transfer_hooks_run_as_in_lightning(tmp_path, case):
    module_hooks, datamodule_hooks = OVERRIDES[case]
    plm, rlm = build_pair(_with_hooks(Regressor, "module", module_hooks))
    data_body = _with_hooks(Data, "datamodule", datamodule_hooks)
    outcome = {}
    for side, model in ((PL, plm), (RL, rlm)):
        datamodule = type(f"{data_body.__name__}_{side.name}", (data_body, side.DataModule), {})()
        trainer = side.trainer(str(tmp_path / side.name), max_epochs=2, num_sanity_val_steps=1)
        CALLS.clear()
        torch.manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, datamodule=datamodule)
            predictions = trainer.predict(model, datamodule=datamodule)
        outcome[side.name] = (list(CALLS), trainer, predictions, [str(w.message) for w in caught])
    (pl_calls, pl_trainer, pl_pred, _), (rl_calls, rl_trainer, rl_pred, rl_warnings) = outcome.values()
    assert_same_sequence(pl_calls, rl_calls, "batch-transfer hook calls")
    assert_fit_parity(Run(PL, pl_trainer, plm), Run(RL, rl_trainer, rlm))
    for expected, actual in zip(pl_pred, rl_pred):
        assert all(torch.allclose(e, a, atol=1e-6) for e, a in zip(expected, actual))
    ignored = [w for w in rl_warnings if "the module's is ignored" in w]
    both = set(module_hooks) & set(datamodule_hooks)
    assert len(ignored) == 2 * len(both)  # once for fit, once for predict
    assert all(any(f".{name} and " in w for w in ignored) for name in both)


def test_plain_batches_skip_the_transfer_hooks(tmp_path):
    # The fast path stays: neither the module nor the datamodule overrides a hook, on the CPU.
    trainer = RL.trainer(str(tmp_path), max_epochs=1)
    datamodule = type("Data_raylight", (Data, RL.DataModule), {})()
    trainer.fit(module_class(Regressor, RL)(), datamodule=datamodule)
    assert trainer._engine._plain_transfer


# ------------------------------------------------------------------------------ two gloo ranks
DDP_SAMPLES = 20  # 10 per rank: batches of 4, 4, 2


def iterable_ddp_worker(rank: int, out_dir: str, stops: list[int | None]) -> None:
    """Fits on this rank's shard, without a length and (when every rank has the same) with one; saves the results."""
    from runtime.engine import Engine
    from tests.runtime import distributed_helpers as h

    shards = {"unsized": lambda: DataLoader(Rows(DDP_SAMPLES, start=rank, step=2, stop=stops[rank]), batch_size=4)}
    if stops == [None, None]:
        shards["sized"] = lambda: loader(n=DDP_SAMPLES)  # the DistributedSampler gives each rank the same shard
    results = {}
    for kind, shard in shards.items():
        torch.manual_seed(0)
        model = module_class(Probe, RL)()
        engine = Engine(h.quiet_config(out_dir, max_epochs=2, accumulate_grad_batches=2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.fit(model, shard(), loader(n=8, seed=99))
        results[kind] = {
            "weights": h.cpu_state(model),
            "events": model.events,
            "warnings": [str(w.message) for w in caught if "another rank's has run out" in str(w.message)],
        }
    h.save_result(out_dir, "unsized", rank, results)


def test_unsized_loader_under_ddp_ends_epochs_as_a_sized_one(tmp_path):
    from tests.runtime import distributed_helpers as h

    h.spawn(iterable_ddp_worker, tmp_path, str(tmp_path), [None, None], pg_timeout_s=30)
    ranks = h.load_results(tmp_path, "unsized")
    for result in ranks:
        assert_same_sequence(result["sized"]["events"], result["unsized"]["events"], "training events")
        for key, value in result["sized"]["weights"].items():
            assert torch.equal(value, result["unsized"]["weights"][key]), key
        assert result["unsized"]["warnings"] == []
    assert [e for e in ranks[0]["unsized"]["events"] if e[0] == "val"] == [("val", 0, 2), ("val", 1, 4)]
    assert ranks[0]["unsized"]["events"] == ranks[1]["unsized"]["events"]


def test_unsized_loaders_of_different_lengths_under_ddp_end_each_epoch_together(tmp_path):
    # Rank 0 has 3 batches per epoch, rank 1 has 2. Lightning lets each rank decide alone (rank 0 would step
    # into a third batch while rank 1 validates, and hang); here every rank ends the epoch at rank 1's last.
    from tests.runtime import distributed_helpers as h

    h.spawn(iterable_ddp_worker, tmp_path, str(tmp_path), [None, 12], pg_timeout_s=30)
    ranks = h.load_results(tmp_path, "unsized")
    events = [r["unsized"]["events"] for r in ranks]
    assert events[0] == events[1]
    trained = [e[:3] for e in events[0] if e[0] == "train"]
    assert trained == [("train", 0, 0), ("train", 0, 1), ("train", 1, 0), ("train", 1, 1)]
    assert [e for e in events[0] if e[0] == "val"] == [("val", 0, 1), ("val", 1, 2)]
    for key, value in ranks[0]["unsized"]["weights"].items():
        assert torch.equal(value, ranks[1]["unsized"]["weights"][key]), key
    assert len(ranks[0]["unsized"]["warnings"]) == 2 and ranks[1]["unsized"]["warnings"] == []  # once per epoch
