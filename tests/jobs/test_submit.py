"""`raylight submit/logs/stop/fetch` against a real Ray head with the dashboard (Ray Jobs API).

The head runs in its own mount namespace with an empty tmpfs over the submitter's working
directory, so the job can only get the script through the Jobs API upload, and the run
directory can only come back through the dashboard: nothing is shared through the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raylight(*args: str, env: dict | None = None, timeout: float = 240, cwd: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=cwd or ROOT,
    )


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """The submitter's working directory: the classifier example and nothing else."""
    work = tmp_path_factory.mktemp("submitter")
    shutil.copy(os.path.join(ROOT, "examples", "classifier.py"), work)
    return str(work)


@pytest.fixture(scope="module")
def dashboard(work_dir):
    """http:// address of a head node (dashboard on) that cannot see ``work_dir``."""
    if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        import ray

        ray.init(num_cpus=1, include_dashboard=False)  # writes the token `ray start` then requires
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rlj-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    port, dashboard_port, agent_port, agent_grpc_port = (_free_port() for _ in range(4))
    command = (
        f"mount -t tmpfs tmpfs {work_dir} && exec {RAY} start --head --port={port} --node-ip-address=127.0.0.1 "
        f"--dashboard-host=127.0.0.1 --dashboard-port={dashboard_port} --include-dashboard=true --num-cpus=4 "
        # Jobs go through the node's dashboard agent: its default port may be held by another Ray on this machine.
        f"--dashboard-agent-listen-port={agent_port} --dashboard-agent-grpc-port={agent_grpc_port} "
        f"--disable-usage-stats --temp-dir={temp_dir} --block"
    )
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    try:
        while raylight("logs", "no-such-job", "--address", address, timeout=60).stderr.find("no job") < 0:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not start: {open(log.name).read()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        for sig, wait in ((15, 5), (9, 10)):  # the head's whole session, nothing else
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(400)
def test_submitted_example_trains_on_the_cluster_and_its_run_directory_comes_back(dashboard, work_dir):
    result = raylight(
        "submit", "--address", dashboard, "--working-dir", work_dir, "--",
        "python", "classifier.py", "--num-workers", "2", "--max-epochs", "2", "--root", "runs",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.split("submitted job ")[1].split()[0]
    assert "val_acc=" in result.stdout  # the job's own output, followed live
    assert f"job {job_id} succeeded" in result.stdout
    assert "INFO" not in result.stderr, result.stderr  # Ray's chatter stays out of the console

    (run,) = [os.path.join(work_dir, "runs", name) for name in os.listdir(os.path.join(work_dir, "runs"))]
    assert f"run directory: {run}" in result.stdout
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"] == {"hidden": 64, "lr": 0.01}
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run))
    with open(os.path.join(run, "status.json")) as f:
        status = json.load(f)
    assert status["status"] == "finished" and status["last_checkpoint"] == os.path.join(run, "checkpoints", "last.ckpt")

    listed = raylight("ls", os.path.join(work_dir, "runs"))
    assert os.path.basename(run) in listed.stdout and "finished" in listed.stdout

    logs = raylight("logs", job_id, "--address", dashboard)
    assert logs.returncode == 0 and "val_acc=" in logs.stdout

    # Fetching again (e.g. from another checkout) gives the same files.
    again = raylight("fetch", job_id, "--address", dashboard, "--dest", str(os.path.join(work_dir, "copy")))
    assert again.returncode == 0, again.stderr
    copy = os.path.join(work_dir, "copy", "runs", os.path.basename(run), "checkpoints", "last.ckpt")
    assert torch.equal(torch.load(copy, weights_only=True)["state_dict"]["model.0.weight"], ckpt["state_dict"]["model.0.weight"])


@pytest.mark.timeout(200)
def test_stop_ends_a_running_job(dashboard, work_dir):
    started = raylight(
        "submit", "--address", dashboard, "--working-dir", work_dir, "--no-wait", "--",
        "python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)",
    )
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.split("submitted job ")[1].split()[0]
    stopped = raylight("stop", job_id, "--address", dashboard)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job_id}: stopped", stopped.stdout + stopped.stderr


def test_errors_are_one_line_with_a_nonzero_exit(dashboard, tmp_path):
    unreachable = raylight("submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", "python", "train.py")
    no_job = raylight("logs", "raylight-nope", "--address", dashboard)
    no_token_env = {k: v for k, v in ENV.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    no_token = raylight("logs", "raylight-nope", "--address", dashboard, env={**no_token_env, "HOME": str(tmp_path)})
    bad_path = raylight(
        "logs", "raylight-nope", "--address", dashboard, env={**ENV, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}
    )
    wrong_token = raylight("logs", "raylight-nope", "--address", dashboard, env={**ENV, "RAY_AUTH_TOKEN": "0" * 32})
    no_command = raylight("submit", "--address", dashboard)
    no_run_dir = raylight("resume", str(tmp_path / "missing"))
    expected = {
        "unreachable": (unreachable, "raylight submit: cannot reach the Ray dashboard at http://127.0.0.1:"),
        "no job": (no_job, "raylight logs: no job 'raylight-nope' on the cluster at"),
        "no token": (no_token, "raylight logs: the Ray cluster at"),
        "bad token path": (bad_path, f"raylight logs: RAY_AUTH_TOKEN_PATH={tmp_path / 'none'} cannot be read"),
        "wrong token": (wrong_token, "raylight logs: the Ray cluster at"),
        "no command": (no_command, "raylight submit: nothing to run: give the command after --"),
        "no run dir": (no_run_dir, "raylight resume: "),
    }
    for case, (result, start) in expected.items():
        assert result.returncode != 0, case
        assert result.stderr.startswith(start) and result.stderr.count("\n") == 1, (case, result.stderr)
    assert "requires a token" in no_token.stderr and "refused the token" in wrong_token.stderr


def test_every_command_has_help():
    for command in ("submit", "logs", "stop", "fetch", "ls", "resume"):
        result = raylight(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: raylight {command}"), command
