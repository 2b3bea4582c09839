"""What writing a checkpoint-sized file costs when earlier ones stay in the page cache, and when they leave it.

    python tests/benchmarks/probe_page_cache.py [--size 512] [--files 4] [--rounds 2] [--dir DIR]

No Ray, no torch: one process writes ``--files`` files of ``--size`` MiB into
``--dir`` (default: a temporary directory on the same disk as /tmp), 32 MiB
per ``write``, each file fsynced and kept until the round ends, as a run that
keeps every checkpoint keeps them; two ways, side by side in every round:

- ``keep``: the files stay in the page cache after their fsync (what a plain
  ``torch.save`` + fsync leaves behind);
- ``drop``: what is on disk leaves the page cache every 64 MiB and after the
  final fsync (``posix_fadvise(DONTNEED)``), as the driver's sink actor does
  with an arriving checkpoint (``launcher/ray/driver_sink.py``).

Printed per file: wall time and the process's system CPU time. On the 2-CPU VM
the README's figures come from, a kept file's successor pays for memory the
kernel has not handed out lately: system time grows with each kept file, while
the dropped files' pages serve the next one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

MIB = 2**20
WRITE_BYTES = 32 * MIB
WRITEBACK_BYTES = 64 * MIB


def write_file(path: str, data: memoryview, drop: bool) -> tuple[float, float]:
    start, cpu = time.perf_counter(), os.times()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        on_disk = 0
        for offset in range(0, len(data), WRITE_BYTES):
            os.write(fd, data[offset : offset + WRITE_BYTES])
            end = offset + WRITE_BYTES
            if drop and end - on_disk >= WRITEBACK_BYTES:
                os.fdatasync(fd)
                os.posix_fadvise(fd, on_disk, end - on_disk, os.POSIX_FADV_DONTNEED)
                on_disk = end
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return time.perf_counter() - start, os.times().system - cpu.system


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="MiB per file")
    parser.add_argument("--files", type=int, default=4, help="files kept per way and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not hasattr(os, "posix_fadvise"):
        parser.error("this system has no posix_fadvise: there is nothing to compare")
    data = memoryview(os.urandom(args.size * MIB))
    print(f"{args.files} files of {args.size} MiB per way, fsynced and kept until the round ends; "
          f"wall s (system CPU s) per file")
    totals = {"keep": [], "drop": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for r in range(args.rounds):
            for way in ("keep", "drop") if r % 2 == 0 else ("drop", "keep"):
                paths = [os.path.join(directory, f"{way}-{i}") for i in range(args.files)]
                results = [write_file(path, data, way == "drop") for path in paths]
                for path in paths:
                    os.remove(path)
                totals[way].append(sum(wall for wall, _ in results))
                cells = ", ".join(f"{wall:.2f} ({system:.2f})" for wall, system in results)
                print(f"round {r + 1} {way}: {cells}", flush=True)
    keep, drop = sum(totals["keep"]), sum(totals["drop"])
    print(f"all files: keep {keep:.2f} s, drop {drop:.2f} s, drop / keep {drop / keep:.2f}x")


if __name__ == "__main__":
    main()
