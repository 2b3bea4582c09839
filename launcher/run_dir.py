"""The driver's run directory: ``<default_root_dir>/<run_name>/``, the source of truth for a run.

Layout::

    spec.json           the validated TrainerSpec
    status.json         running / finished / failed / interrupted, epoch, step, last checkpoint
    checkpoints/        last.ckpt and the ModelCheckpoint files
    events.out.tfevents.*, metrics.csv   written by the loggers
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # launcher.spec imports torch (through runtime): `raylight ls` reads run directories without it.
    from launcher.spec import TrainerSpec


@dataclass
class RunDir:
    path: str

    @classmethod
    def for_spec(cls, spec: TrainerSpec) -> "RunDir":
        from launcher.spec import new_run_name

        root = os.path.abspath(spec.default_root_dir or os.path.join(os.getcwd(), "runs"))
        return cls(os.path.join(root, spec.run_name or new_run_name()))

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def last_checkpoint(self) -> str:
        return os.path.join(self.checkpoint_dir, "last.ckpt")

    def create(self, spec: TrainerSpec) -> None:
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        _write_json(os.path.join(self.path, "spec.json"), json.loads(spec.to_json()))

    def write_status(self, status: str, **fields: Any) -> None:
        record = {"status": status, "updated": time.time(), **fields}
        if status == "running":  # who to ask whether it still is: `raylight ls` checks the process
            record.setdefault("driver", {"host": socket.gethostname(), "pid": os.getpid()})
        _write_json(os.path.join(self.path, "status.json"), record)

    def record_checkpoint(self, path: str, epoch: int, global_step: int) -> None:
        """A checkpoint was committed: `raylight ls` shows a running (or dead) run's progress from it."""
        record = self.read_status()
        if record.get("status", "running") != "running":
            return  # a late commit must not overwrite an end status
        record.update(epoch=epoch, global_step=global_step, last_checkpoint=path, updated=time.time())
        _write_json(os.path.join(self.path, "status.json"), record)

    def shown_status(self) -> str:
        """The status for a person: "running" of a driver that no longer exists on this host is "preempted"."""
        record = self.read_status()
        status = record.get("status", "unknown")
        driver = record.get("driver") or {}
        if status == "running" and driver.get("host") == socket.gethostname() and not _alive(driver.get("pid")):
            return "preempted"  # the driver stopped without writing an end status: killed, preempted, lost
        return status

    def read_status(self) -> dict[str, Any]:
        """status.json's record; ``{}`` when there is none, ``{"status": "unreadable"}`` when it is damaged."""
        try:
            with open(os.path.join(self.path, "status.json")) as f:
                record = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # empty or cut short (a machine that lost power), or not JSON
            return {"status": "unreadable"}
        return record if isinstance(record, dict) else {"status": "unreadable"}

    def newest_checkpoint(self) -> str | None:
        """The most recently written ``checkpoints/*.ckpt`` (hidden, half-written files excluded)."""
        return newest(glob.glob(os.path.join(self.checkpoint_dir, "*.ckpt")))

    def newest_last_checkpoint(self) -> str | None:
        return newest_last_in(self.checkpoint_dir)


def newest_last_in(directory: str) -> str | None:
    """The newest ``last*.ckpt`` in ``directory``: ``last.ckpt``, or ``last-v1.ckpt`` where an earlier run in the
    same directory had kept its own (ModelCheckpoint versions a taken name)."""
    return newest(glob.glob(os.path.join(directory, "last*.ckpt")))


def find_last_checkpoint(root: str) -> str | None:
    """The newest ``<root>/<run>/checkpoints/last.ckpt``, for ``ckpt_path="last"`` without a run_name."""
    return newest(glob.glob(os.path.join(root, "*", "checkpoints", "last.ckpt")))


def newest(paths: list[str]) -> str | None:
    """The most recently modified of ``paths``; None when there are none."""
    return max(paths, key=os.path.getmtime) if paths else None


def end_status(err: BaseException) -> str:
    """The status a run that stopped with ``err`` ends with: "interrupted" for Ctrl-C, else "failed"."""
    return "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
