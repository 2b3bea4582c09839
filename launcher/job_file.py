"""The serialised job in a run directory, signed so that `raylight resume` never unpickles a tampered file.

A pickle runs code when it is loaded, so anyone who can write to a run
directory could otherwise make `raylight resume` run their code. The job
file is signed with HMAC-SHA256 under a per-user key kept outside every run
directory (``$RAYLIGHT_KEY_FILE``, default ``~/.config/raylight/job.key``,
created with mode 0600); the signature is checked before unpickling.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

import cloudpickle

JOB_FILE = "job.pkl"
SIGNATURE_FILE = "job.pkl.sig"


class JobFileError(RuntimeError):
    """The run directory's job file is missing, unsigned or does not match its signature."""


def key_path() -> str:
    return os.environ.get("RAYLIGHT_KEY_FILE") or os.path.expanduser("~/.config/raylight/job.key")


def _key() -> bytes:
    path = key_path()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


def _sign(data: bytes) -> str:
    return hmac.new(_key(), data, hashlib.sha256).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_job(run_dir: str, record: dict[str, Any]) -> None:
    """cloudpickle ``record`` (job, loggers, ...) into the run directory with its signature."""
    data = cloudpickle.dumps(record)
    _atomic_write(os.path.join(run_dir, JOB_FILE), data)
    _atomic_write(os.path.join(run_dir, SIGNATURE_FILE), _sign(data).encode())


def read_job(run_dir: str) -> dict[str, Any]:
    """Verify the signature, then unpickle; refuses (without unpickling) anything that does not verify."""
    job_path = os.path.join(run_dir, JOB_FILE)
    sig_path = os.path.join(run_dir, SIGNATURE_FILE)
    try:
        with open(job_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise JobFileError(
            f"{job_path} does not exist: this run directory has no saved job (was it written by a raylight Trainer, "
            "and did fit() start?); start the run again from its script"
        ) from None
    try:
        with open(sig_path) as f:
            signature = f.read().strip()
    except FileNotFoundError:
        raise JobFileError(f"{sig_path} is missing: refusing to unpickle an unsigned job file") from None
    if not hmac.compare_digest(signature, _sign(data)):
        raise JobFileError(
            f"{job_path} does not match its signature (it was changed after the run wrote it, or it was written "
            f"by another user's key at {key_path()}): refusing to unpickle it. Start the run again from its script"
        )
    return cloudpickle.loads(data)
