"""Making a finished file durable under its final name, without importing torch.

Shared by the runtime's atomic checkpoint save and the driver's sink actor
(which is kept free of torch), so both commit a file the same way.
"""

from __future__ import annotations

import errno
import os


def fsync_directory(directory: str) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk, where the filesystem can."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows: directories cannot be opened for fsync.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (certain FUSE and network mounts) do not support
        # fsync on a directory; the rename is still atomic there, only its
        # durability across power loss is up to the filesystem.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def replace_durably(tmp: str, path: str) -> None:
    """Rename the complete, fsynced ``tmp`` over ``path`` and flush the rename."""
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))
