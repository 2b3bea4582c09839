"""What the evaluation epoch-end hooks read in trainer.callback_metrics and trainer.progress_bar_metrics.

The common "collect each epoch's validation metrics" callback reads them in
``on_validation_epoch_end``: in Lightning the values the steps of this pass
logged are already there (not the previous pass's), and what the hook logs
itself shows up in ``on_validation_end``. The same holds for test passes.
"""

from __future__ import annotations

import pytest

from tests.parity.bodies import Regressor
from tests.parity.harness import as_float, assert_same_metrics, callback_class, loader, run_both

FIT = dict(max_epochs=2, num_sanity_val_steps=1)
TRAIN_AND_VAL = lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": loader(n=10, seed=99)}  # noqa: E731


def _read(trainer) -> dict[str, dict[str, float]]:
    return {
        "callback_metrics": {k: as_float(v) for k, v in trainer.callback_metrics.items()},
        "progress_bar_metrics": {k: as_float(v) for k, v in trainer.progress_bar_metrics.items()},
    }


class EpochEndReads:
    """A user's callback: what it reads at the end of each evaluation epoch and pass."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[tuple, dict]] = []

    def _take(self, trainer, hook: str) -> None:
        self.reads.append(((hook, trainer.sanity_checking, trainer.current_epoch), _read(trainer)))

    def on_validation_epoch_end(self, trainer, pl_module):
        self._take(trainer, "on_validation_epoch_end")

    def on_validation_end(self, trainer, pl_module):
        self._take(trainer, "on_validation_end")

    def on_test_epoch_end(self, trainer, pl_module):
        self._take(trainer, "on_test_epoch_end")

    def on_test_end(self, trainer, pl_module):
        self._take(trainer, "on_test_end")


class EpochEndLogger(Regressor):
    """Logs epoch values (the default in the evaluation steps), a step-only bar value, and one value from the
    epoch-end hook, which first records what it reads itself."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[tuple, dict]] = []

    def _log_eval(self, batch, prefix: str) -> None:
        x, y = batch
        self.log(f"{prefix}_y_max", y.max(), reduce_fx="max", prog_bar=True)
        self.log(f"{prefix}_x_mean", x.mean(), on_step=True, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}_bar_step", y.mean(), on_step=True, on_epoch=False, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self._log_eval(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        super().test_step(batch, batch_idx)
        self._log_eval(batch, "test")

    def on_validation_epoch_end(self):
        self.reads.append((("module", self.trainer.sanity_checking, self.current_epoch), _read(self.trainer)))
        self.log("val_hook", 1.5 + self.current_epoch, prog_bar=True)

    def on_test_epoch_end(self):
        self.reads.append((("module", False, self.current_epoch), _read(self.trainer)))
        self.log("test_hook", 2.5, prog_bar=True)


def _assert_same_reads(expected: list, actual: list, who: str) -> None:
    assert [where for where, _ in actual] == [where for where, _ in expected], who
    for where, exp in expected:
        act = dict(actual)[where]
        for what in exp:
            assert_same_metrics(exp[what], act[what], f"{who}: trainer.{what} in {where}")


def _run(tmp_path, method: str, data, trainer_args=None):
    pl_run, rl_run = run_both(
        EpochEndLogger,
        tmp_path=tmp_path,
        method=method,
        data=data,
        trainer_args=trainer_args,
        callbacks=lambda side: [callback_class(EpochEndReads, side)()],
    )
    assert pl_run.model.reads, "the epoch-end hook never ran"
    _assert_same_reads(pl_run.callbacks[0].reads, rl_run.callbacks[0].reads, "callback")
    _assert_same_reads(pl_run.model.reads, rl_run.model.reads, "module")
    return pl_run, rl_run


def test_validation_epoch_end_reads_this_epochs_values_during_fit(tmp_path):
    # The sanity check, then two epochs: each epoch-end read must hold that epoch's values, not the last one's.
    pl_run, rl_run = _run(tmp_path, "fit", TRAIN_AND_VAL, FIT)
    history = [reads["callback_metrics"]["val_loss"] for (hook, sanity, _), reads in rl_run.callbacks[0].reads
               if hook == "on_validation_epoch_end" and not sanity]
    assert len(history) == 2 and history[0] != history[1]


def test_validation_epoch_end_reads_this_passes_values_in_validate(tmp_path):
    _run(tmp_path, "validate", lambda: {"dataloaders": loader(n=10, seed=99)})


@pytest.mark.parametrize("num_loaders", [1, 2])
def test_test_epoch_end_reads_this_passes_values(tmp_path, num_loaders):
    loaders = lambda: {"dataloaders": [loader(n=10, seed=99 + i) for i in range(num_loaders)]}  # noqa: E731
    _run(tmp_path, "test", loaders)


def test_logged_metric_is_computed_for_the_epoch_end_hook_and_reset_after_it(tmp_path):
    torchmetrics = pytest.importorskip("torchmetrics")

    class ValMAE(Regressor):
        def __init__(self):
            super().__init__()
            self.val_mae = torchmetrics.MeanAbsoluteError()
            self.seen: list[tuple[float, float]] = []

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_mae(self(x), y)
            self.log("val_mae", self.val_mae, prog_bar=True)

        def on_validation_epoch_end(self):
            # The Metric still holds the epoch's state here: its own compute() agrees with what was published.
            self.seen.append((as_float(self.trainer.callback_metrics["val_mae"]), float(self.val_mae.compute())))

    pl_run, rl_run = run_both(ValMAE, tmp_path=tmp_path, data=TRAIN_AND_VAL, trainer_args=FIT)
    assert len(rl_run.model.seen) == len(pl_run.model.seen) == 3  # the sanity check and two epochs
    for side_run in (pl_run, rl_run):
        for published, computed in side_run.model.seen:
            assert published == pytest.approx(computed, abs=1e-6), side_run.side
    assert [s for s, _ in rl_run.model.seen] == pytest.approx([s for s, _ in pl_run.model.seen], abs=1e-6)
    assert rl_run.model.val_mae.update_count == 0
