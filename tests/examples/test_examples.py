"""Every example runs end to end (shortened) and leaves what it promises: files, metrics, printed results.

Each example runs as a user runs it, in a subprocess. All but the classifier train in-process
(``num_workers=0``, their default); the classifier runs with its default, a local Ray with 2 workers,
because that is the README's first command.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, tmp_path: Path, timeout: float, **env: str) -> str:
    """Runs ``examples/<name> args...``; returns its stdout after checking that it succeeded."""
    environment = dict(
        os.environ,
        RAYLIGHT_KEY_FILE=str(tmp_path / "key" / "job.key"),  # not the user's own job-signing key
        # Two torch threads per process thrash on a busy 2-core CI machine (a 10 s run took 70 s).
        OMP_NUM_THREADS="1",
        **env,
    )
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout,
        env=environment, cwd=tmp_path,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def printed(stdout: str, label: str) -> str:
    """The rest of the line that starts with ``label`` (e.g. "best checkpoint:")."""
    match = re.search(rf"^{re.escape(label)}\s*(.+)$", stdout, re.MULTILINE)
    assert match, f"the output has no {label!r} line:\n{stdout[-2000:]}"
    return match.group(1).strip()


def printed_number(stdout: str, name: str) -> float:
    match = re.search(rf"\b{re.escape(name)}=([0-9.]+)", stdout)
    assert match, f"the output prints no {name}=:\n{stdout[-2000:]}"
    return float(match.group(1))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scalars(log_dir: str | Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def last_value(events: EventAccumulator, tag: str) -> float:
    return events.Scalars(tag)[-1].value


# ------------------------------------------------------------------ classifier: the README's first command


@pytest.mark.timeout(240)
def test_classifier_trains_on_a_local_ray_and_points_at_its_logs_and_checkpoints(tmp_path):
    # Its defaults (a local Ray, 2 workers), shortened. RAY_AUTH_MODE=token: once ~/.ray/auth_token exists,
    # Ray 2.60 expects token authentication from every process.
    out = run_example("classifier.py", "--max-epochs", "2", "--root", str(tmp_path), tmp_path=tmp_path,
                      timeout=220, RAY_AUTH_MODE="token")

    run = Path(printed(out, "run directory:"))
    assert run.parent == tmp_path and json.loads((run / "spec.json").read_text())["num_workers"] == 2
    assert json.loads((run / "status.json").read_text())["status"] == "finished"

    last = torch.load(printed(out, "last checkpoint:"), weights_only=True)
    assert last["epoch"] == 1 and last["hyper_parameters"] == {"hidden": 64, "lr": 0.01}
    # Two workers share each epoch: 1437 training images, 64 a batch, half each -> 12 steps an epoch.
    assert last["global_step"] == 24

    # The best checkpoint is a model a user can load on this machine and evaluate.
    example = load_example("classifier")
    best = example.DigitClassifier.load_from_checkpoint(printed(out, "best checkpoint:"))
    _, val = example.digits()
    x, y = (torch.cat(parts) for parts in zip(*val))
    best.eval()
    with torch.no_grad():
        accuracy = (best(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8, f"the best checkpoint classifies {accuracy:.1%} of the validation digits"

    acc = printed_number(out, "val_acc")
    assert acc > 0.8, f"two epochs on digits should pass 80% validation accuracy, got {acc}"
    logdir = printed(out, "TensorBoard:").removeprefix("tensorboard --logdir ")
    events = scalars(logdir)
    assert {"train_loss", "val_loss", "val_acc"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_acc")] == [11, 23], "one validation per epoch, each logged once"
    assert abs(last_value(events, "val_acc") - acc) < 1e-3, "TensorBoard holds the accuracy the script printed"


# ------------------------------------------------------------------ the manual-optimization GAN


@pytest.mark.timeout(120)
def test_gan_trains_both_networks_and_logs_their_losses(tmp_path):
    out = run_example("gan.py", "--max-epochs", "2", "--root", str(tmp_path), tmp_path=tmp_path, timeout=100)

    run = Path(printed(out, "run directory:"))
    last = torch.load(printed(out, "last checkpoint:"), weights_only=True)
    # Manual optimization: global_step counts optimizer steps, two a batch (29 batches of 64 an epoch).
    assert last["global_step"] == 116 and "after 2 epochs, 116 optimizer steps" in out
    assert {k.split(".")[0] for k in last["state_dict"]} == {"generator", "discriminator"}
    assert len(last["optimizer_states"]) == 2, "both optimizers' states are checkpointed"
    for state in last["optimizer_states"]:
        assert all(int(s["step"]) == 58 for s in state["state"].values()), "each optimizer stepped once a batch"

    events = scalars(run)
    assert {"g_loss", "d_loss"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("g_loss")) == 5, "log_every_n_steps=10 over 58 batches"
    for name in ("g_loss", "d_loss"):  # the last batch's losses; binary cross-entropies of a working GAN
        assert 0.05 < printed_number(out, name) < 5 and all(0.05 < e.value < 5 for e in events.Scalars(name))
    assert events.Tags()["images"] == ["generated_digits"]
    image = events.Images("generated_digits")[-1]
    assert (image.width, image.height) == (8 * 8 * 4, 4 * 8 * 4), "a 4x8 grid of 8x8 samples, 4x enlarged"

    # The checkpoint rebuilds the generator, which samples images in the data's range.
    gan = load_example("gan").GAN.load_from_checkpoint(printed(out, "last checkpoint:"))
    assert gan.hparams.latent_dim == 16
    with torch.no_grad():
        samples = gan(torch.randn(5, gan.hparams.latent_dim))
    assert samples.shape == (5, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1


# ------------------------------------------------------------------ LightningDataModule + TensorBoardLogger


@pytest.mark.timeout(120)
def test_datamodule_example_fits_tests_and_writes_tensorboard_logs(tmp_path):
    data_dir = tmp_path / "data"
    out = run_example("datamodule_tensorboard.py", "--max-epochs", "2", "--root", str(tmp_path), "--data-dir",
                      str(data_dir), tmp_path=tmp_path, timeout=100)

    assert (data_dir / "digits.pt").is_file(), "prepare_data() writes the data set"
    log_dir = Path(printed(out, "TensorBoard logs:"))
    assert log_dir == tmp_path / "tb_logs" / "digits_cnn" / "version_0", "the explicit logger's save_dir/name"
    assert printed(out, "view them with:") == f"tensorboard --logdir {tmp_path / 'tb_logs'}"

    events = scalars(log_dir)
    assert {"train_loss", "val_loss", "val_acc", "lr-Adam", "test_loss", "test_acc"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("val_acc")) == 2
    test_acc = printed_number(out, "test_acc")
    assert abs(last_value(events, "test_acc") - test_acc) < 1e-3, "TensorBoard holds the printed test accuracy"
    assert test_acc > 0.8, f"two epochs of the CNN should pass 80% test accuracy, got {test_acc}"
    # The module's and the datamodule's hparams, logged as fit and again as test starts, as in Lightning.
    tables = [h.tensor_proto.string_val[0].decode() for h in events.Tensors("hparams/text_summary")]
    assert len(tables) == 2 and tables[0] == tables[1], tables
    for row in ("|channels|16|", "|lr|0.003|", f"|data_dir|{data_dir}|", "|batch_size|64|"):
        assert row in tables[0], (row, tables[0])

    best = torch.load(printed(out, "best checkpoint:"), weights_only=True)
    assert best["hyper_parameters"] == {"channels": 16, "lr": 3e-3}
    assert best["datamodule_hyper_parameters"] == {"data_dir": str(data_dir), "batch_size": 64}
    # The test ran on the best checkpoint (by val_acc), and that is the accuracy the run reports.
    val_accs = [e.value for e in events.Scalars("val_acc")]
    assert best["epoch"] == val_accs.index(max(val_accs))


# ------------------------------------------------------------------ preemption and resume


@pytest.mark.timeout(180)
def test_preemption_walkthrough_resumes_to_the_uninterrupted_weights(tmp_path):
    out = run_example("preemption_resume.py", "--root", str(tmp_path), tmp_path=tmp_path, timeout=160)

    (walk,) = tmp_path.glob("preemption-*")
    reference, preempted = walk / "reference", walk / "preempted"
    # The driver really died after its step-30 checkpoint, before finishing: no line of its own says so.
    assert "finished" not in (walk / "preempted.log").read_text()
    assert (preempted / "checkpoints" / "epoch=1-step=30.ckpt").is_file()
    assert "RUN" in out and re.search(r"preempted\s+preempted\s+\d+\s+\d+\s", out), "raylight ls showed the dead run"
    assert f"resuming preempted from {preempted / 'checkpoints' / 'last.ckpt'}" in (walk / "resume.log").read_text()

    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(preempted / "checkpoints" / "last.ckpt", weights_only=True)
    assert expected["global_step"] == resumed["global_step"] == 60
    assert expected["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert "resumed weights equal the uninterrupted run's: yes" in out
    assert json.loads((preempted / "status.json").read_text())["status"] == "finished"

    with open(preempted / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train_loss")]
    assert steps == list(range(60)), "every step logged exactly once across the kill and the resume"
