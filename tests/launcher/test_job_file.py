"""The job-signing key: made once per user, the same for every process that signs at the same moment."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from launcher import job_file

SIGN_AT = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("job_file", sys.argv[1])
job_file = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job_file)
while time.time() < float(sys.argv[2]):
    pass
print(job_file._sign(b"the same job"))
"""


def test_processes_that_create_the_key_at_once_all_sign_with_one_key(tmp_path):
    key = tmp_path / "config" / "job.key"
    env = dict(os.environ, RAYLIGHT_KEY_FILE=str(key))
    start = time.time() + 3.0  # every process has loaded the module by then, and they race for the key
    procs = [
        subprocess.Popen([sys.executable, "-c", SIGN_AT, job_file.__file__, str(start)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    signatures = {out.strip() for out, _ in results}
    assert len(signatures) == 1, signatures
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_an_empty_key_file_is_refused_with_what_to_do(tmp_path, monkeypatch):
    key = tmp_path / "job.key"
    key.write_bytes(b"")
    monkeypatch.setenv("RAYLIGHT_KEY_FILE", str(key))
    monkeypatch.setattr(job_file, "KEY_WAIT_SECONDS", 0.1)
    with pytest.raises(job_file.JobFileError, match=r"job\.key is empty .*delete it, and the next run makes a new one"):
        job_file._sign(b"a job")
