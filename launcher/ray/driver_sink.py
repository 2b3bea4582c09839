"""The actor on the driver's node that receives everything the workers send back.

Rank 0's metric rows go to the run's loggers (TensorBoard, CSV) here, so
their files land in the run directory on the driver's disk. Checkpoints
arrive in bounded chunks, or are written in place by a worker that sees the
run directory (one on the driver's node), and are committed atomically here;
restarted workers read the newest committed checkpoint back from here.
Nothing needs a shared filesystem: the actor is pinned to the driver's node.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from runtime.checkpoint.durable import replace_durably

CHUNK_BYTES = 32 * 1024 * 1024
# While a file arrives, what is written is pushed to disk in the background about this often, so the
# fsync that commits it waits for the tail only instead of the whole file.
WRITEBACK_BYTES = 64 * 1024 * 1024


def _drop_from_page_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel that these bytes of a file already on disk will not be read soon (``length`` 0: to the end).

    A run that keeps many checkpoints would otherwise fill the driver node's page cache with them, and each
    new one would need memory the kernel has not handed out lately: on a VM that is the slow part of
    writing a checkpoint (the host backs such pages on first touch). The freed pages serve the next one.
    Only advice: pages not yet on disk stay, and a system without ``posix_fadvise`` keeps them all.
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class _WritebackFile:
    """A file arriving in chunks whose data goes to disk in the background, WRITEBACK_BYTES at a time, so
    that the fsync that commits it waits for the tail only; what is on disk leaves the page cache as the
    file grows (see ``_drop_from_page_cache``), and the pages it frees take the next chunks."""

    def __init__(self, path: str, pool: ThreadPoolExecutor):
        self.name = path
        self.handle = open(path, "xb")
        self._pool = pool
        self._written = 0
        self._written_back = 0  # bytes from the start handed to the background write-back
        self._syncing: Future | None = None

    def write(self, data: Any) -> int:
        """``data``: bytes, or a numpy byte array read from the object store."""
        written = self.handle.write(data)
        self._written += written
        if self._written - self._written_back >= WRITEBACK_BYTES and (self._syncing is None or self._syncing.done()):
            self._wait_for_writeback()  # surfaces an error of the previous one
            self.handle.flush()
            self._syncing = self._pool.submit(self._write_back, self._written_back, self._written)
            self._written_back = self._written
        return written

    def _write_back(self, start: int, end: int) -> None:
        fd = self.handle.fileno()
        os.fdatasync(fd)
        _drop_from_page_cache(fd, start, end - start)

    def _wait_for_writeback(self) -> None:
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            syncing.result()

    def close(self, sync: bool = True) -> None:
        """Close the file; with ``sync``, once all of it is on disk (else after the background writeback)."""
        try:
            self._wait_for_writeback()  # before the file descriptor is closed under it
            if sync:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                _drop_from_page_cache(self.handle.fileno(), self._written_back)
        finally:
            self.handle.close()


class DriverSink:
    """Plain class; wrapped with ``ray.remote`` by the backend (kept importable without Ray running)."""

    def __init__(self, run_dir: str, loggers: list[Any], resume_from: str | None, resume_step: int | None):
        self.run_dir = run_dir
        self.loggers = loggers
        for logger in loggers:
            if hasattr(logger, "attach"):
                logger.attach(run_dir, resume_step=resume_step)
        # Committed checkpoints still on disk, oldest first; restarts resume from the newest.
        self._committed: list[str] = [resume_from] if resume_from else []
        self._uploads: dict[str, tuple[str, _WritebackFile]] = {}  # token -> (final path, the file arriving)
        self._writeback: ThreadPoolExecutor | None = None  # started with the first upload
        # Hidden files being written (streamed, in place, probes): a worker killed mid-write leaves its own
        # behind, removed when the next attempt begins or the run ends.
        self._unfinished: set[str] = set()
        self._progress: list[Any] = []
        self._lock = threading.Lock()
        self.status = "running"
        self.attempts = 0

    # ----------------------------------------------------------- metrics
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def flush(self) -> None:
        for logger in self.loggers:
            flush = getattr(logger, "flush", None)
            if flush is not None:
                flush()

    def progress(self, update: Any) -> None:
        with self._lock:
            self._progress.append(update)

    def take_progress(self) -> list[Any]:
        """Progress updates since the last call (the driver's progress bar polls this)."""
        with self._lock:
            updates, self._progress = self._progress, []
        return updates

    def finalize(self, status: str) -> None:
        self.status = status
        for logger in self.loggers:
            logger.finalize(status)

    def begin_attempt(self, rank: int) -> str | None:
        """A worker of a (re)started group asks where to resume from; rank 0's call counts the attempt.

        On a restart, log rows past the checkpoint (or all of them, with no checkpoint yet) are dropped:
        the new attempt logs them again.
        """
        latest = self.latest_checkpoint()
        if rank != 0:
            return latest
        self.attempts += 1
        if self.attempts > 1:
            self.remove_unfinished()  # the previous group's workers are gone, mid-write or not
            step = 0
            if latest is not None:
                from runtime.checkpoint.io import load_checkpoint

                checkpoint = load_checkpoint(latest)
                fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
                step = int(fit_loop.get("log_resume_step", checkpoint.get("global_step", 0)))
            for logger in self.loggers:
                if hasattr(logger, "attach"):
                    logger.attach(self.run_dir, resume_step=step)
        return latest

    def latest_checkpoint(self) -> str | None:
        return self._committed[-1] if self._committed else None

    def attempt_count(self) -> int:
        return self.attempts

    # ------------------------------------------------------- checkpoints
    def upload_begin(self, path: str) -> str:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        token = uuid.uuid4().hex
        tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.upload-{token[:8]}")
        if self._writeback is None:
            self._writeback = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylight-writeback")
        self._uploads[token] = (path, _WritebackFile(tmp, self._writeback))
        self._unfinished.add(tmp)
        return token

    def upload_chunk(self, token: str, data: Any) -> None:
        """``data``: a numpy byte array, read from the object store without a copy."""
        self._uploads[token][1].write(data)

    def upload_commit(self, token: str, is_checkpoint: bool = True, progress: dict | None = None) -> str:
        path, arriving = self._uploads.pop(token)
        arriving.close(sync=True)
        return self._commit(arriving.name, path, is_checkpoint, progress)

    def expect_written(self, tmp: str) -> None:
        """A worker that sees this directory is about to write ``tmp`` itself, for ``commit_written``."""
        self._unfinished.add(tmp)

    def filesystem_probe(self) -> tuple[str, str]:
        """A new file in the run directory and its content: a worker that reads the same sees this directory."""
        token = uuid.uuid4().hex
        path = os.path.join(self.run_dir, f".probe-{token[:8]}")
        os.makedirs(self.run_dir, exist_ok=True)
        self._unfinished.add(path)
        with open(path, "w") as f:
            f.write(token)
        return path, token

    def commit_written(self, tmp: str, path: str, is_checkpoint: bool = True, progress: dict | None = None) -> str:
        """Commit ``tmp``, which a worker that sees this directory wrote next to ``path`` itself."""
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            _drop_from_page_cache(fd)
        finally:
            os.close(fd)
        return self._commit(tmp, path, is_checkpoint, progress)

    def _commit(self, tmp: str, path: str, is_checkpoint: bool, progress: dict | None) -> str:
        """Rename the complete, fsynced ``tmp`` over ``path`` durably; a checkpoint becomes the newest one."""
        replace_durably(tmp, path)
        self._unfinished.discard(tmp)
        if is_checkpoint:
            if path in self._committed:
                self._committed.remove(path)
            self._committed.append(path)
            if progress is not None:
                from launcher.run_dir import RunDir

                RunDir(self.run_dir).record_checkpoint(path, progress["epoch"], progress["global_step"])
        return path

    def upload_abort(self, token: str) -> None:
        _, arriving = self._uploads.pop(token, (None, None))
        if arriving is not None:
            try:
                arriving.close(sync=False)
            except OSError:
                pass
            self._remove_file(arriving.name)

    def remove_unfinished(self) -> None:
        """Remove the hidden files that workers began and never finished (killed mid-write)."""
        for token in list(self._uploads):
            self.upload_abort(token)
        for path in list(self._unfinished):
            self._remove_file(path)

    def _remove_file(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        self._unfinished.discard(path)

    def remove(self, path: str) -> None:
        self._remove_file(path)
        if path in self._committed:
            self._committed.remove(path)

    def listdir(self, directory: str) -> list[str]:
        """The names in a directory of the driver's node (ModelCheckpoint's file-name versions need them)."""
        from runtime.sinks import list_directory

        return list_directory(directory)

    def file_size(self, path: str) -> int:
        return os.path.getsize(path)

    def file_identity(self, path: str) -> tuple[int, int, int, int]:
        """(device, inode, size, mtime in ns): a worker that sees the same can read the file itself."""
        st = os.stat(path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def read_chunk(self, path: str, offset: int, size: int) -> Any:
        """A numpy byte array: it reaches the worker through the object store without another copy."""
        import numpy as np

        with open(path, "rb") as f:
            f.seek(offset)
            return np.fromfile(f, dtype=np.uint8, count=size)
