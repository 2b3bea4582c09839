"""The Ray worker's malloc settings: memory a step frees stays for the next step (glibc on Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Frees 200 blocks of 1 MiB (each above glibc's starting mmap threshold) and reports how much of that
# memory the process still holds, from /proc/self/statm.
PROBE = textwrap.dedent(
    """
    import os, sys
    from launcher.ray.worker import tune_allocator

    applied = tune_allocator() if sys.argv[1] == "tune" else False
    page = os.sysconf("SC_PAGE_SIZE")

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = resident()
    blocks = [bytes([i % 251]) * (1 << 20) for i in range(200)]
    del blocks
    print(applied, (resident() - before) / (1 << 20))
    """
)


def _probe(mode: str, **env: str) -> tuple[bool, float]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=environ, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings, read from /proc")
def test_a_tuned_worker_keeps_freed_step_memory_and_users_can_opt_out():
    applied, kept_mib = _probe("tune")
    if not applied:
        pytest.skip("this Python does not run on glibc: raylight leaves its allocator alone")
    assert kept_mib > 150, f"the freed 200 MiB should stay with the process, kept {kept_mib:.0f} MiB"

    # glibc's own settings give the blocks back as they are freed.
    assert _probe("plain")[1] < 50
    # RAYLIGHT_TUNE_MALLOC=0, or the user's own MALLOC_* thresholds, leave glibc's settings in place.
    for env in ({"RAYLIGHT_TUNE_MALLOC": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}):
        applied, kept_mib = _probe("tune", **env)
        assert not applied and kept_mib < 50, (env, kept_mib)
