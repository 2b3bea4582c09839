"""Exact resume in one process: an interrupted and resumed run ends with the uninterrupted run's weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runtime import LightningModule, ModelCheckpoint, seed_everything
from runtime.config import RunConfig
from runtime.engine import Engine


class Interrupt(Exception):
    pass


class DropoutNet(LightningModule):
    """Dropout, shuffling, a scheduler and Adam: every piece of state that exact resume must carry."""

    def __init__(self, precision_scaler_check: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.stop_at_step: int | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.stop_at_step is not None and self.global_step >= self.stop_at_step:
            raise Interrupt(f"simulated crash at step {self.global_step}")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data(n: int = 52) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g))


def _loaders():
    ds = _data()
    return DataLoader(ds, batch_size=8, shuffle=True), DataLoader(ds, batch_size=16)


def _run(tmp_path, name: str, stop_at_step=None, ckpt=None, accumulate: int = 1, precision: str = "32-true", **cfg):
    seed_everything(123)
    model = DropoutNet()
    model.stop_at_step = stop_at_step
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / name), every_n_train_steps=3, save_top_k=-1, save_last=True)
    config = RunConfig(
        max_epochs=3,
        default_root_dir=str(tmp_path / name),
        accumulate_grad_batches=accumulate,
        precision=precision,
        num_sanity_val_steps=0,
        **cfg,
    )
    engine = Engine(config, callbacks=[ckpt_cb])
    train, val = _loaders()
    if stop_at_step is not None:
        with pytest.raises(Interrupt):
            engine.fit(model, train, val, ckpt=ckpt)
    else:
        engine.fit(model, train, val, ckpt=ckpt)
    return model, engine, ckpt_cb


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs after resume: max abs diff {(x - y).abs().max().item()}"


@pytest.mark.parametrize("stop_at_step", [3, 7, 9])  # mid-epoch (7 steps per epoch), and on an epoch boundary
def test_resume_mid_epoch_is_bit_exact(tmp_path, stop_at_step):
    reference, ref_engine, _ = _run(tmp_path, "reference")

    _, _, crashed_cb = _run(tmp_path, "crashed", stop_at_step=stop_at_step)
    saved = sorted(os.listdir(tmp_path / "crashed"))
    assert "last.ckpt" in saved
    last = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert last["global_step"] <= stop_at_step

    resumed, engine, _ = _run(tmp_path, "crashed", ckpt=str(tmp_path / "crashed" / "last.ckpt"))
    _assert_same_weights(reference, resumed)
    assert engine.global_step == ref_engine.global_step
    assert engine.current_epoch == ref_engine.current_epoch
    assert float(engine.callback_metrics["train_loss_epoch"]) == pytest.approx(
        float(ref_engine.callback_metrics["train_loss_epoch"]), abs=1e-6
    )


def test_resume_with_accumulation_and_mixed_precision_scaler(tmp_path):
    reference, _, _ = _run(tmp_path, "reference", accumulate=2, precision="16-mixed")
    _run(tmp_path, "crashed", stop_at_step=4, accumulate=2, precision="16-mixed")
    last = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert "scale" in last["MixedPrecision"], "the GradScaler state must be in the checkpoint"
    resumed, _, _ = _run(tmp_path, "crashed", ckpt=str(tmp_path / "crashed" / "last.ckpt"), accumulate=2, precision="16-mixed")
    _assert_same_weights(reference, resumed)


def test_resume_from_every_intermediate_checkpoint(tmp_path):
    reference, _, cb = _run(tmp_path, "reference")
    steps = sorted(f for f in os.listdir(tmp_path / "reference") if f.startswith("epoch="))
    assert len(steps) >= 5
    for name in steps[:-1]:
        resumed, _, _ = _run(tmp_path, f"from-{name}", ckpt=str(tmp_path / "reference" / name))
        _assert_same_weights(reference, resumed)
