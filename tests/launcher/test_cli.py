"""The `raylight` command line without a cluster: one-line errors for bad input, `ls --json` as data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from runtime import LightningModule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNROUTABLE_GCS = "192.0.2.2:6379"  # TEST-NET-1: nothing answers


@pytest.fixture
def env(tmp_path):
    """No cluster address anywhere, and a Ray temp dir of its own: no local cluster to find by accident."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(tmp_path / "ray"), RAYLIGHT_KEY_FILE=str(tmp_path / "key" / "job.key"))
    return env


def raylight(*args: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=ROOT,
    )


def _one_line(result: subprocess.CompletedProcess, start: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith(start) and result.stderr.count("\n") == 1, result.stderr[-2000:]
    return result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ submit --env


@pytest.mark.parametrize("item", ["FOO", "=x", ""])
def test_submit_env_item_without_a_name_and_equals_is_one_line_naming_it(env, item):
    result = raylight("submit", "--address", f"http://127.0.0.1:{_free_port()}", "--env", item, "--",
                      "python", "t.py", env=env)
    shown = item or "''"
    message = _one_line(result, f"raylight submit: --env {shown}: expected KEY=VALUE")
    assert "Traceback" not in message


def test_parse_env_keeps_equals_in_the_value():
    from launcher.submit import SubmitError, parse_env

    assert parse_env(["A=b=c", "EMPTY=", "B=2"]) == {"A": "b=c", "EMPTY": "", "B": "2"}
    with pytest.raises(SubmitError, match=r"--env NOPE: expected KEY=VALUE"):
        parse_env(["A=1", "NOPE"])


# ------------------------------------------------------------------ addresses


def test_no_address_anywhere_says_what_is_missing_and_how_to_pass_it(env):
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # Ray's SDK finds any local GCS process (pgrep), whatever RAY_TMPDIR says
        pytest.skip("a Ray cluster runs on this machine: with no address the SDK connects to it")
    message = _one_line(raylight("fetch", "raylight-x", env=env), "raylight fetch: no Ray dashboard address was given")
    assert "None" not in message
    assert "--address http://HEAD:8265" in message and "RAY_API_SERVER_ADDRESS" in message


def test_address_flag_wins_over_a_gcs_address_in_ray_address(env):
    # Ray's SDK prefers $RAY_API_SERVER_ADDRESS to its argument; --address must win over any variable.
    dashboard = f"http://127.0.0.1:{_free_port()}"
    result = raylight("fetch", "raylight-x", "--address", dashboard, env={**env, "RAY_ADDRESS": UNROUTABLE_GCS})
    _one_line(result, f"raylight fetch: cannot reach the Ray dashboard at {dashboard}")


def test_resolve_address_order_and_explain_without_one(monkeypatch):
    from launcher.submit import explain, resolve_address

    monkeypatch.setenv("RAY_ADDRESS", "http://from-ray-address:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://from-api-server:8265")
    assert resolve_address("http://flag:8265") == "http://flag:8265"
    assert resolve_address(None) == "http://from-api-server:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert resolve_address(None) == "http://from-ray-address:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(None) is None and resolve_address("auto") == "auto"
    assert resolve_address("head:6379") == "head:6379"  # a cluster address: Ray's SDK asks it for the dashboard
    text = explain(ConnectionError("Could not find any running Ray instance."), None)
    assert text.startswith("no Ray dashboard address was given") and "at None" not in text


# ------------------------------------------------------------------ resume


class _Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resume_with_an_invalid_override_is_one_line_and_exit_2(tmp_path, env, monkeypatch):
    monkeypatch.setenv("RAYLIGHT_KEY_FILE", env["RAYLIGHT_KEY_FILE"])  # the job file is signed with the CLI's key
    x = torch.randn(8, 2)
    trainer = Trainer(max_steps=2, default_root_dir=str(tmp_path), run_name="run", logger=False,
                      enable_progress_bar=False)
    trainer.fit(_Tiny(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
    status_before = (tmp_path / "run" / "status.json").read_text()

    result = raylight("resume", str(tmp_path / "run"), "--num-workers", "-1", env=env, timeout=120)
    message = _one_line(result, "raylight resume: num_workers: expected an int >= 0")
    assert "(got -1)" in message and "Traceback" not in message
    assert (tmp_path / "run" / "status.json").read_text() == status_before, "nothing ran"


# ------------------------------------------------------------------ ls --json


def _run_dir(root, name: str, status: dict | None) -> str:
    path = root / name
    (path / "checkpoints").mkdir(parents=True)
    (path / "spec.json").write_text("{}")
    if status is not None:
        (path / "status.json").write_text(json.dumps(status))
    return str(path)


def test_ls_json_gives_numbers_nulls_absolute_paths_and_timestamps(tmp_path, env):
    root = tmp_path / "runs"
    done = _run_dir(root, "done", None)
    checkpoint = os.path.join(done, "checkpoints", "last.ckpt")
    (root / "done" / "status.json").write_text(json.dumps({
        "status": "finished", "epoch": 3, "global_step": 18, "best_score": 0.125, "last_checkpoint": checkpoint,
        "updated": 1700000000.5,
    }))
    _run_dir(root, "fresh", None)  # no status.json yet
    (root / "not-a-run").mkdir()

    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ls", "runs", "--json"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["run"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"done", "fresh"}
    assert rows["done"] == {
        "run": "done", "path": done, "status": "finished", "epoch": 3, "global_step": 18, "best_score": 0.125,
        "last_checkpoint": checkpoint, "updated": 1700000000.5,
    }
    assert rows["fresh"] == {
        "run": "fresh", "path": str(root / "fresh"), "status": "unknown", "epoch": None, "global_step": None,
        "best_score": None, "last_checkpoint": None, "updated": None,
    }

    table = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ls", "runs"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=60,
    ).stdout.splitlines()
    assert table[0].split()[:4] == ["RUN", "STATUS", "EPOCH", "STEP"]
    assert table[1].split()[:6] == ["done", "finished", "3", "18", "0.125", "done/checkpoints/last.ckpt"]
