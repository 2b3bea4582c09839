"""Each ``precision`` setting trains exactly like the plain PyTorch loop it stands for.

For every setting the same module (same initial weights) is trained twice on
the same batches: once by ``Trainer(precision=...)`` and once by a
hand-written loop using ``torch.autocast`` / ``torch.amp.GradScaler`` /
dtype conversion directly. The final weights must agree. The CPU runs always
happen; the CUDA runs only where a GPU is present.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from runtime import LightningModule, ModelCheckpoint, seed_everything

LR = 0.05
ATOL = 1e-6

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


class Regressor(LightningModule):
    """A small MLP that records what ``training_step`` saw (input dtypes, output dtype, autocast)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        out = self.net(x)
        self.seen.append(
            {
                "x": x.dtype,
                "y": y.dtype,
                "idx": idx.dtype,
                "out": out.dtype,
                "device": x.device.type,
                "autocast": torch.is_autocast_enabled(x.device.type),
            }
        )
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=LR)


def _loader(target_scale: float = 1.0) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 8, generator=g)
    y = target_scale * torch.randn(48, 1, generator=g)
    idx = torch.arange(48)  # an integer tensor: precision must never convert it
    return DataLoader(TensorDataset(x, y, idx), batch_size=8)


def _fit(tmp_path, precision: str, device: str, loader: DataLoader, **trainer_kwargs):
    seed_everything(11)
    model = Regressor()
    initial = copy.deepcopy(model.net)
    args = dict(
        num_workers=0,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        precision=precision,
        enable_checkpointing=False,
    )
    if device == "cuda":
        args["use_gpu"] = True
    else:
        args["accelerator"] = "cpu"  # on a GPU machine accelerator="auto" would take the GPU
    args.update(trainer_kwargs)
    trainer = Trainer(**args)
    trainer.fit(model, loader)
    return model, initial, trainer


def _hand_loop(
    net: nn.Module,
    loader: DataLoader,
    device: str,
    autocast_dtype: torch.dtype | None = None,
    param_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip: float | None = None,
    clip_before_unscale: bool = False,
) -> nn.Module:
    """The plain PyTorch loop each precision setting is documented to be."""
    net = net.to(device)
    if param_dtype is not None:
        net = net.to(param_dtype)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for x, y, _ in loader:
        x, y = x.to(device), y.to(device)
        if param_dtype is not None:
            x, y = x.to(param_dtype), y.to(param_dtype)
        opt.zero_grad()
        context = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with context:
            loss = nn.functional.mse_loss(net(x), y)
        if scaler is None:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            continue
        scaler.scale(loss).backward()
        if clip is not None:
            if clip_before_unscale:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                scaler.unscale_(opt)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return net


def _assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert list(actual_state) == list(expected_state)
    for key in expected_state:
        assert actual_state[key].dtype == expected_state[key].dtype, key
        torch.testing.assert_close(actual_state[key], expected_state[key], atol=ATOL, rtol=0, msg=key)


def _assert_changed(trained: nn.Module, initial: nn.Module) -> None:
    trained_state = trained.state_dict()
    initial_state = {k: v.to(trained_state[k].device) for k, v in initial.state_dict().items()}
    assert any(not torch.allclose(trained_state[k].double(), initial_state[k].double()) for k in trained_state)


# ------------------------------------------------------------------------ 16-mixed


@pytest.mark.parametrize("device", DEVICES)
def test_16_mixed_matches_autocast_and_grad_scaler_loop(tmp_path, device):
    # Targets large enough that the first scaled gradients overflow in float16: the scaler must skip
    # those steps and back off, exactly as the hand-written loop's scaler does.
    loader = _loader(target_scale=20.0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)
    model, initial, _ = _fit(tmp_path, "16-mixed", device, loader, enable_checkpointing=True, callbacks=[ckpt])

    scaler = torch.amp.GradScaler(device)
    expected = _hand_loop(copy.deepcopy(initial), loader, device, autocast_dtype=torch.float16, scaler=scaler)

    assert scaler.get_scale() < 2.0**16, "the data should make the scaler skip at least one step"
    _assert_changed(expected, initial)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_same_weights(model.net, expected)
    assert {s["out"] for s in model.seen} == {torch.float16}
    assert all(s["autocast"] for s in model.seen)
    assert {s["x"] for s in model.seen} == {torch.float32}  # autocast converts inside ops, not the batch

    checkpoint = torch.load(os.path.join(tmp_path, "ckpts", "last.ckpt"), weights_only=True)
    assert "MixedPrecision" in checkpoint
    assert checkpoint["MixedPrecision"] == scaler.state_dict()


@pytest.mark.parametrize("device", DEVICES)
def test_16_mixed_clips_gradients_after_unscaling(tmp_path, device):
    loader = _loader(target_scale=20.0)
    clip = 0.05
    model, initial, _ = _fit(tmp_path, "16-mixed", device, loader, gradient_clip_val=clip)

    expected = _hand_loop(
        copy.deepcopy(initial), loader, device, autocast_dtype=torch.float16,
        scaler=torch.amp.GradScaler(device), clip=clip,
    )
    _assert_same_weights(model.net, expected)

    # Controls: the comparison above would notice clipping in the wrong place, or no clipping at all.
    scaled_clip = _hand_loop(
        copy.deepcopy(initial), loader, device, autocast_dtype=torch.float16,
        scaler=torch.amp.GradScaler(device), clip=clip, clip_before_unscale=True,
    )
    unclipped = _hand_loop(
        copy.deepcopy(initial), loader, device, autocast_dtype=torch.float16, scaler=torch.amp.GradScaler(device)
    )
    for other in (scaled_clip, unclipped):
        assert any(
            not torch.allclose(a, b, atol=ATOL, rtol=0)
            for a, b in zip(model.net.state_dict().values(), other.state_dict().values())
        )


# ---------------------------------------------------------------------- bf16-mixed


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_mixed_matches_bfloat16_autocast_loop(tmp_path, device):
    loader = _loader()
    model, initial, _ = _fit(tmp_path, "bf16-mixed", device, loader)

    expected = _hand_loop(copy.deepcopy(initial), loader, device, autocast_dtype=torch.bfloat16)

    _assert_changed(expected, initial)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_same_weights(model.net, expected)
    assert {s["out"] for s in model.seen} == {torch.bfloat16}
    assert all(s["autocast"] for s in model.seen)


# ---------------------------------------------------------------- bf16-true / 64-true


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_true_trains_a_bfloat16_model_on_bfloat16_inputs(tmp_path, device):
    loader = _loader()
    model, initial, _ = _fit(tmp_path, "bf16-true", device, loader)

    expected = _hand_loop(copy.deepcopy(initial), loader, device, param_dtype=torch.bfloat16)

    _assert_changed(expected, initial.to(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_same_weights(model.net, expected)
    assert {(s["x"], s["y"], s["idx"]) for s in model.seen} == {(torch.bfloat16, torch.bfloat16, torch.int64)}
    assert not any(s["autocast"] for s in model.seen)


@pytest.mark.parametrize("device", DEVICES)
def test_64_true_trains_in_float64_with_float64_inputs(tmp_path, device):
    loader = _loader()
    model, initial, _ = _fit(tmp_path, "64-true", device, loader)

    expected = _hand_loop(copy.deepcopy(initial), loader, device, param_dtype=torch.float64)

    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {(s["x"], s["y"], s["idx"]) for s in model.seen} == {(torch.float64, torch.float64, torch.int64)}
    assert {s["device"] for s in model.seen} == {device}
    assert {s["out"] for s in model.seen} == {torch.float64}
    _assert_same_weights(model.net, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_32_true_leaves_float32(tmp_path, device):
    loader = _loader()
    model, initial, trainer = _fit(tmp_path, "32-true", device, loader)

    expected = _hand_loop(copy.deepcopy(initial), loader, device)

    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {(s["x"], s["y"], s["idx"], s["out"]) for s in model.seen} == {
        (torch.float32, torch.float32, torch.int64, torch.float32)
    }
    assert not any(s["autocast"] for s in model.seen)
    _assert_same_weights(model.net, expected)
    trainer.save_checkpoint(str(tmp_path / "manual.ckpt"))
    assert "MixedPrecision" not in torch.load(tmp_path / "manual.ckpt", weights_only=True)
