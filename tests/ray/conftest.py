"""One real Ray cluster for the whole Ray test session, started with `ray start --head`.

Tests that need a second node add one to this cluster (see ``add_node``), inside
its own mount namespace when it must not see the driver's files. Everything
started here is stopped here: nodes by their raylet process, the cluster with
`ray stop` at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

os.environ["RAY_AUTH_MODE"] = "token"  # Ray 2.60 expects token auth once ~/.ray/auth_token exists
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RAY = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Address of a head node with 4 CPUs and one `slot` resource (one worker per node when asked)."""
    import ray

    if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        # The first local ray.init writes the token that `ray start` then requires.
        ray.init(num_cpus=1, include_dashboard=False)
        ray.shutdown()
    port = _free_port()
    temp_dir = str(tmp_path_factory.mktemp("ray-head"))
    log = open(os.path.join(temp_dir, "head.log"), "w")
    # --block keeps the head's processes in one session of ours, so teardown stops exactly them
    # (never `ray stop`, which would also stop clusters other sessions on this machine started).
    head = subprocess.Popen(
        [
            RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
            "--resources=" + json.dumps({"slot": 1}), "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", "--block",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while _ray("status", f"--address={address}", timeout=60).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            _stop_session(head)
            raise RuntimeError(f"the Ray head did not start: {open(log.name).read()[-3000:]}")
        time.sleep(1)
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_session(head)


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and everything in its session."""
    for sig, wait in ((15, 5), (9, 10)):  # `ray start --block` may ignore SIGTERM for long: do not wait 30 s
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def add_node(ray_cluster, tmp_path):
    """Start an extra node on this machine: add_node(cpus, resources, hide=[paths]) -> its node id.

    ``hide`` paths get an empty tmpfs mounted over them inside the node's own mount namespace
    (`unshare --mount`), so processes on that node cannot see what the driver writes there.
    """
    import ray

    started: list[str] = []

    def start(cpus: int = 2, resources: dict | None = None, hide: list[str] = ()) -> str:
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else set()
        log = tmp_path / f"node-{len(started)}.log"
        mounts = "".join(f"mount -t tmpfs tmpfs {p} && " for p in hide)
        cmd = (
            f"{mounts}exec {RAY} start --address={ray_cluster} --node-ip-address=127.0.0.1 --num-cpus={cpus} "
            f"--resources='{json.dumps(resources or {})}' --disable-usage-stats --block"
        )
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd] if hide else ["sh", "-c", cmd],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        if not ray.is_initialized():
            ray.init(address=ray_cluster)
        deadline = time.time() + 90
        while time.time() < deadline:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            new = alive - before - set(started)
            if new:
                node = new.pop()
                started.append(node)
                return node
            if proc.poll() is not None:
                raise RuntimeError(f"extra Ray node exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"extra Ray node did not join within 90 s: {log.read_text()[-2000:]}")

    procs: list[subprocess.Popen] = []
    yield start
    for proc in procs:
        _stop_session(proc)  # `ray start --block` keeps the node's processes in this session
    if ray.is_initialized():
        deadline = time.time() + 60
        while time.time() < deadline and any(n["NodeID"] in started and n["Alive"] for n in ray.nodes()):
            time.sleep(1)
