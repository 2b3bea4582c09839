"""trainer.validate / test return values (one dict per dataloader, dataloader_idx suffixes) and predict outputs."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

import runtime

from tests.parity.bodies import Regressor
from tests.parity.harness import PL, SIDES, assert_fit_parity, assert_same_metrics, build_pair, loader, run_both


class MultiLoaderProbe(Regressor):
    def _eval(self, prefix, batch, batch_idx, dataloader_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log(f"{prefix}_loss", loss)  # "/dataloader_idx_N" added with several loaders
        self.log(f"{prefix}_forked", y.mean(), on_step=True, on_epoch=True)
        self.log(f"{prefix}_sum", y.sum(), reduce_fx="sum", prog_bar=True)
        self.log(f"{prefix}_own_dl{dataloader_idx}", loss, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval("test", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self):
        self.log("val_epoch_end", 7.0)

    def on_test_epoch_end(self):
        self.log("test_epoch_end", 8.0)


def _eval_loaders(count):
    return [loader(n=10, seed=99), loader(n=7, seed=98, batch_size=3)][:count]


@pytest.mark.parametrize("stage", ["validate", "test"])
@pytest.mark.parametrize("count", [1, 2], ids=["one-loader", "two-loaders"])
def test_evaluate_results(tmp_path, stage, count):
    pl_run, rl_run = run_both(
        MultiLoaderProbe,
        tmp_path=tmp_path,
        method=stage,
        data=lambda: {"dataloaders": _eval_loaders(count) if count > 1 else _eval_loaders(1)[0], "verbose": False},
    )
    assert isinstance(rl_run.result, list) and len(rl_run.result) == len(pl_run.result) == count
    for idx, (exp, act) in enumerate(zip(pl_run.result, rl_run.result)):
        assert_same_metrics(exp, act, f"{stage}() result for dataloader {idx}")
    assert_same_metrics(pl_run.trainer.callback_metrics, rl_run.trainer.callback_metrics, "callback_metrics")
    assert_same_metrics(
        pl_run.trainer.progress_bar_metrics, rl_run.trainer.progress_bar_metrics, "progress_bar_metrics"
    )


_CELL = re.compile(r"\S+(?: \S+)*")  # words separated by single spaces ("Test metric", "DataLoader 0")


def _results_table(printed: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, {metric: one cell per dataloader column}) of the table printed after validate/test.

    A cell belongs to the header column whose centre is nearest, so a blank cell stays in its column.
    """
    lines = [line for line in printed.splitlines() if line.strip() and set(line.strip()) != {"\u2500"}]
    header, *rows = lines
    columns = list(_CELL.finditer(header))
    centres = [(m.start() + m.end()) / 2 for m in columns]
    table = {}
    for line in rows:
        cells = [""] * len(columns)
        for m in _CELL.finditer(line):
            centre = (m.start() + m.end()) / 2
            cells[min(range(len(centres)), key=lambda i: abs(centres[i] - centre))] = m.group()
        table[cells[0]] = cells[1:]
    return [m.group() for m in columns], table


@pytest.mark.parametrize("stage", ["validate", "test"])
@pytest.mark.parametrize("count", [1, 2], ids=["one-loader", "two-loaders"])
def test_printed_results_table(tmp_path, capsys, stage, count):
    """verbose=True prints Lightning's table: a header per dataloader, a row per metric, blank where not logged."""
    printed = {}
    for side, model in zip(SIDES, build_pair(MultiLoaderProbe)):
        capsys.readouterr()
        loaders = _eval_loaders(count) if count > 1 else _eval_loaders(1)[0]
        getattr(side.trainer(str(tmp_path / side.name)), stage)(model, loaders, verbose=True)
        printed[side.name] = capsys.readouterr().out
    pl_header, pl_rows = _results_table(printed["lightning"])
    rl_header, rl_rows = _results_table(printed["raylight"])
    assert rl_header == pl_header == [f"{stage.capitalize()} metric", *(f"DataLoader {i}" for i in range(count))]
    assert list(rl_rows) == list(pl_rows), printed["raylight"]
    for name, cells in pl_rows.items():
        blanks = [cell == "" for cell in cells]
        assert [cell == "" for cell in rl_rows[name]] == blanks, f"row {name!r}: {cells} vs {rl_rows[name]}"
        for expected, actual in zip(cells, rl_rows[name]):
            if expected:
                assert math.isclose(float(expected), float(actual), abs_tol=1e-6), f"row {name!r}"


def test_fit_with_two_val_dataloaders(tmp_path):
    pl_run, rl_run = run_both(
        MultiLoaderProbe,
        tmp_path=tmp_path,
        data=lambda: {"train_dataloaders": loader(n=22), "val_dataloaders": _eval_loaders(2)},
        trainer_args=dict(max_epochs=2),
    )
    assert_fit_parity(pl_run, rl_run, progress_bar=True)


class Predictor(Regressor):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, _ = batch
        return {"y": self(x), "idx": torch.full((x.shape[0],), batch_idx), "dl": dataloader_idx}


def _assert_same_predictions(expected, actual, where="predictions"):
    assert type(actual) is type(expected), (
        f"{where}: lightning {type(expected).__name__}, raylight {type(actual).__name__}"
    )
    if isinstance(expected, torch.Tensor):
        assert torch.allclose(expected, actual, atol=1e-6, rtol=0), f"{where}: {expected} vs {actual}"
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(expected)} vs {sorted(actual)}"
        for key in expected:
            _assert_same_predictions(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: {len(expected)} items in lightning, {len(actual)} in raylight"
        for i, (e, a) in enumerate(zip(expected, actual)):
            _assert_same_predictions(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {expected!r} vs {actual!r}"


@pytest.mark.parametrize("count", [1, 2], ids=["one-loader", "two-loaders"])
def test_predict_outputs(tmp_path, count):
    pl_run, rl_run = run_both(
        Predictor,
        tmp_path=tmp_path,
        method="predict",
        data=lambda: {"dataloaders": _eval_loaders(count) if count > 1 else _eval_loaders(1)[0]},
    )
    _assert_same_predictions(pl_run.result, rl_run.result)


def test_predict_with_default_predict_step(tmp_path):
    # LightningModule.predict_step's default calls self(batch): here the batch is a plain tensor.
    class DefaultPredict(Regressor):
        predict_step = None  # removed below so the base class's default is used

    del DefaultPredict.predict_step
    data = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    pl_run, rl_run = run_both(
        DefaultPredict,
        tmp_path=tmp_path,
        method="predict",
        data=lambda: {"dataloaders": torch.utils.data.DataLoader(data, batch_size=4)},
    )
    _assert_same_predictions(pl_run.result, rl_run.result)


def test_predict_limit_batches(tmp_path):
    pl_run, rl_run = run_both(
        Predictor,
        tmp_path=tmp_path,
        method="predict",
        data=lambda: {"dataloaders": loader(n=22)},
        trainer_args=dict(limit_predict_batches=3),
    )
    _assert_same_predictions(pl_run.result, rl_run.result)



def _fit_then(side, root, model, **trainer_args):
    """A 3-epoch fit keeping the best validation checkpoint and last.ckpt in ``root/ckpts``."""
    ckpt = side.ModelCheckpoint(dirpath=str(root / "ckpts"), monitor="val_loss", save_top_k=1, save_last=True)
    args = dict(max_epochs=3, num_sanity_val_steps=0, enable_checkpointing=True, callbacks=[ckpt], **trainer_args)
    trainer = side.trainer(str(root), **args)
    torch.manual_seed(1)
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(n=10, seed=99))
    return trainer, ckpt


def test_evaluating_without_a_model_after_fit_uses_the_best_checkpoint(tmp_path):
    results = {}
    for side, model in zip(SIDES, build_pair(Regressor, lr=0.5)):
        trainer, ckpt = _fit_then(side, tmp_path / side.name, model)
        assert ckpt.best_model_path != ckpt.last_model_path
        (results[side.name + " as is"],) = trainer.test(model, dataloaders=loader(n=10, seed=7), verbose=False)
        with pytest.warns(UserWarning, match="best"):
            (results[side.name],) = trainer.test(dataloaders=loader(n=10, seed=7), verbose=False)
    assert_same_metrics(results["lightning"], results["raylight"], "test() without a model")
    assert results["raylight"] != results["raylight as is"], "the best checkpoint's weights, not the final ones"


def test_ckpt_path_last_is_the_checkpoint_callbacks_own_last_file(tmp_path):
    root = tmp_path / "root"
    for side, model in zip(SIDES, build_pair(Regressor, lr=0.1, seed=5)):
        # A run under ``root`` with its own last.ckpt (raylight's default callback keeps one in its run directory).
        side.trainer(str(root / side.name), max_epochs=1, enable_checkpointing=True).fit(model, loader())
    results = {}
    for side, model in zip(SIDES, build_pair(Regressor, lr=0.5)):
        _, ckpt = _fit_then(side, tmp_path / side.name, model)
        own = side.ModelCheckpoint(dirpath=str(tmp_path / side.name / "ckpts"))
        fresh = side.trainer(str(root / side.name), enable_checkpointing=True, callbacks=[own])
        (results[side.name],) = fresh.test(model, dataloaders=loader(n=10, seed=7), ckpt_path="last", verbose=False)
        expected = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), side.name
    assert_same_metrics(results["lightning"], results["raylight"], 'test(ckpt_path="last")')


def test_fit_with_ckpt_path_last_and_no_checkpoint_yet_starts_from_the_beginning(tmp_path):
    models = build_pair(Regressor, lr=0.5)
    for side, model in zip(SIDES, models):
        ckpt = side.ModelCheckpoint(dirpath=str(tmp_path / side.name / "ckpts"), save_last=True)
        trainer = side.trainer(str(tmp_path / side.name), max_epochs=2, enable_checkpointing=True, callbacks=[ckpt])
        torch.manual_seed(1)
        with pytest.warns(UserWarning, match="last"):
            trainer.fit(model, train_dataloaders=loader(), ckpt_path="last")
        assert trainer.global_step == 12
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


class _RecordingWriter:
    """A prediction writer body: records what each write call receives."""

    def __init__(self, write_interval: str) -> None:
        super().__init__(write_interval)
        self.batches: list[tuple] = []
        self.epoch: tuple | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.batches.append((list(batch_indices), prediction["y"].clone(), batch_idx, dataloader_idx))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self.epoch = (predictions, batch_indices)


def _writer(side, interval):
    base = pl.callbacks.BasePredictionWriter if side is PL else runtime.BasePredictionWriter
    return type(f"RecordingWriter_{side.name}", (_RecordingWriter, base), {})(interval)


@pytest.mark.parametrize("interval", ["batch", "epoch", "batch_and_epoch"])
@pytest.mark.parametrize("return_predictions", [True, False])
@pytest.mark.parametrize("count", [1, 2], ids=["one-loader", "two-loaders"])
def test_prediction_writer(tmp_path, interval, return_predictions, count):
    writers = {}
    results = {}
    for side, model in zip(SIDES, build_pair(Predictor)):
        writers[side.name] = writer = _writer(side, interval)
        trainer = side.trainer(str(tmp_path / side.name), callbacks=[writer])
        data = _eval_loaders(count) if count > 1 else _eval_loaders(1)[0]
        results[side.name] = trainer.predict(model, data, return_predictions=return_predictions)
    expected, actual = writers["lightning"], writers["raylight"]
    assert (results["raylight"] is None) == (not return_predictions)
    assert [b[0] for b in actual.batches] == [b[0] for b in expected.batches]  # dataset indices of each batch
    assert [b[2:] for b in actual.batches] == [b[2:] for b in expected.batches]
    for (_, e, *_), (_, a, *_) in zip(expected.batches, actual.batches):
        assert torch.allclose(e, a, atol=1e-6)
    if interval == "batch":
        assert actual.epoch is None and actual.batches
    else:
        _assert_same_predictions(expected.epoch[0], actual.epoch[0], "write_on_epoch_end predictions")
        assert actual.epoch[1] == expected.epoch[1], "write_on_epoch_end batch indices"


class FrozenPart(Regressor):
    """A module whose first layer the user keeps in eval mode (a frozen, pretrained part)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].eval()


@pytest.mark.parametrize("method", ["predict", "validate", "test"])
def test_an_evaluation_call_leaves_each_submodule_in_the_mode_it_found_it(tmp_path, method):
    pl_run, rl_run = run_both(FrozenPart, tmp_path=tmp_path, method=method, data=lambda: {"dataloaders": loader()})
    modes = lambda run: [m.training for m in run.model.modules()]  # noqa: E731
    assert modes(rl_run) == modes(pl_run)
    assert rl_run.model.training and not rl_run.model.net[0].training


class FrozenPartModes(FrozenPart):
    def __init__(self) -> None:
        super().__init__()
        self.modes_in_training: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.modes_in_training.append(self.net[0].training)
        return super().training_step(batch, batch_idx)


def test_a_frozen_submodule_stays_in_eval_mode_through_fits_validations(tmp_path):
    data = lambda: {"train_dataloaders": loader(n=16), "val_dataloaders": loader(n=8, seed=99)}  # noqa: E731
    pl_run, rl_run = run_both(FrozenPartModes, tmp_path=tmp_path, data=data, trainer_args={"max_epochs": 2})
    assert rl_run.model.modes_in_training == pl_run.model.modes_in_training == [False] * 8
    assert_fit_parity(pl_run, rl_run)


def test_a_module_in_eval_mode_trains_in_it_with_a_warning_as_in_lightning(tmp_path):
    class EvalAtStart(FrozenPartModes):
        def __init__(self) -> None:
            super().__init__()
            self.eval()

    with pytest.warns(UserWarning, match=r"in eval mode as training starts"):
        pl_run, rl_run = run_both(EvalAtStart, tmp_path=tmp_path, trainer_args={"max_epochs": 1})
    assert rl_run.model.modes_in_training == pl_run.model.modes_in_training == [False] * 6
    assert not rl_run.model.training
