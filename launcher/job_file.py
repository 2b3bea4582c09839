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
import threading
import time
from typing import Any

import cloudpickle

JOB_FILE = "job.pkl"
KEY_WAIT_SECONDS = 5.0  # how long to wait for a key file that another process is creating to hold its bytes
SIGNATURE_FILE = "job.pkl.sig"


class JobFileError(RuntimeError):
    """The run directory's job file is missing, unsigned or does not match its signature."""


def key_path() -> str:
    return os.environ.get("RAYLIGHT_KEY_FILE") or os.path.expanduser("~/.config/raylight/job.key")


def _key() -> bytes:
    path = key_path()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process or thread created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            return key
    return _read_key(path)


def _read_key(path: str) -> bytes:
    # A key file that another process or thread has just created may not hold its bytes yet: wait briefly.
    deadline = time.monotonic() + KEY_WAIT_SECONDS
    while True:
        with open(path, "rb") as f:
            key = f.read()
        if key:
            return key
        if time.monotonic() > deadline:
            raise JobFileError(
                f"the job-signing key {path} is empty (a process stopped while creating it?); delete it, and "
                "the next run makes a new one"
            )
        time.sleep(0.01)


def _sign(data: bytes) -> str:
    return hmac.new(_key(), data, hashlib.sha256).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobWrite:
    """A job file being signed, written and fsynced by a background thread.

    Those steps take milliseconds for a job that carries its data (hashing and
    writing megabytes, then waiting for the disk), and need nothing from
    training, so training starts meanwhile; they run without Python's GIL.
    """

    def __init__(self, run_dir: str, data: bytes):
        self.run_dir = run_dir
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, args=(data,), name="raylight-job-write")
        self._thread.start()

    def _write(self, data: bytes) -> None:
        try:
            _atomic_write(os.path.join(self.run_dir, JOB_FILE), data)
            _atomic_write(os.path.join(self.run_dir, SIGNATURE_FILE), _sign(data).encode())
        except BaseException as err:  # noqa: BLE001 - handed to wait()'s caller
            self._error = err

    def wait(self) -> BaseException | None:
        """Block until the file is on disk; returns the error that stopped the write, if any."""
        self._thread.join()
        return self._error


def write_job(run_dir: str, record: dict[str, Any]) -> JobWrite:
    """cloudpickle ``record`` (job, loggers, ...) now; sign and write it into the run directory in the background.

    The pickling happens before this returns, so changes made to the record's objects afterwards (training
    the module, a logger opening its files) do not reach the file. Call ``wait()`` on the result before
    relying on the file.
    """
    return JobWrite(run_dir, cloudpickle.dumps(record))


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
