"""Every example runs end to end (shortened) and leaves what it promises on disk."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_classifier_example_trains_and_writes_checkpoints(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "classifier.py"), "--max-epochs", "2", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"] == {"hidden": 64, "lr": 0.01}
    acc = float(result.stdout.split("val_acc=")[1].split()[0])
    assert acc > 0.8, f"two epochs on digits should pass 80% accuracy, got {acc}"
