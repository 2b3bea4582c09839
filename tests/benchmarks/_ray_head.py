"""A Ray head for the benchmark scripts: started in its own session, stopped by that session only.

Ray 2.60 writes ``~/.ray/auth_token`` on a local ``ray.init()`` and then expects
token authentication, so the head and every client get ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    return dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")


class RayHead:
    def __init__(self, process: subprocess.Popen, address: str):
        self.process = process
        self.address = address

    def processes_named(self, fragment: str) -> list[psutil.Process]:
        """This head's descendant processes whose command line (Ray's process title) contains ``fragment``."""
        found = []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                if fragment in " ".join(child.cmdline()):
                    found.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found


@contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[RayHead]:
    """``ray start --head --block`` on a free port, in its own session; killed by process group at exit."""
    env = ray_env()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # On a machine that never ran Ray, `ray start` in token mode finds no token: create the user's one.
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="bench-ray-")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while subprocess.run([ray_bin, "status", f"--address={address}"], env=env, capture_output=True).returncode:
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError("the Ray head did not start")
            time.sleep(1)
        yield RayHead(head, address)
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)  # the head's logs and sockets


def machine() -> dict[str, object]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    import ray

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def run_child(args: list[str], timeout: float = 1800, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one variant as its own Python process (``python <args>``) with Ray's token mode; raise on failure."""
    done = subprocess.run([sys.executable, *args], env={**ray_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"variant {args[1:]} failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return done
