"""What writing a checkpoint-sized file costs when earlier ones stay in the page cache, and when they leave it.

    python tests/benchmarks/probe_page_cache.py [--size 512] [--files 4] [--rounds 2] [--dir DIR]

No Ray, no torch: one process writes ``--files`` files of ``--size`` MiB into
``--dir`` (default: a temporary directory on the same disk as /tmp), each
fsynced and kept until the round ends, as a run that keeps every checkpoint
keeps them; two ways, side by side in every round. Both write through the
driver's sink actor's own file writer (``_WritebackFile`` in
``launcher/ray/driver_sink.py``), as an arriving checkpoint is written: in the
sink's chunks (``CHUNK_BYTES``), every 64 MiB a background thread pushes what
was written to disk, and the commit fsyncs the tail. They differ in one thing:

- ``drop``: as the sink runs, what is on disk leaves the page cache
  (``posix_fadvise(DONTNEED)``, ``_drop_from_page_cache``);
- ``keep``: that call is switched off, so the files stay in the page cache
  after their fsync (as the sink left them before it dropped pages, and as a
  plain ``torch.save`` + fsync leaves them).

Printed per file: wall time and the process's system CPU time. On the 2-CPU VM
the README's figures come from, a kept file's successor pays for memory the
kernel has not handed out lately: kept files cost up to 1.2 s of system time
each (less only right after a dropped round, whose pages are still free),
while the dropped files' pages serve the next one (about 0.27 s each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import launcher.ray.driver_sink as sink  # noqa: E402  (imports neither Ray nor torch)

MIB = 2**20


def write_file(path: str, data: memoryview, pool: ThreadPoolExecutor, drop: bool) -> tuple[float, float]:
    """Write ``data`` in the sink's chunks through its writer and commit it (fsync); ``drop``: as the sink does."""
    kept = sink._drop_from_page_cache
    if not drop:
        sink._drop_from_page_cache = lambda fd, offset=0, length=0: None
    try:
        start, cpu = time.perf_counter(), os.times()
        file = sink._WritebackFile(path, pool)
        for offset in range(0, len(data), sink.CHUNK_BYTES):
            file.write(data[offset : offset + sink.CHUNK_BYTES])
        file.close(sync=True)
        return time.perf_counter() - start, os.times().system - cpu.system
    finally:
        sink._drop_from_page_cache = kept


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
    with tempfile.TemporaryDirectory(dir=args.dir) as directory, ThreadPoolExecutor(1) as pool:
        for r in range(args.rounds):
            for way in ("keep", "drop") if r % 2 == 0 else ("drop", "keep"):
                paths = [os.path.join(directory, f"{way}-{i}") for i in range(args.files)]
                results = [write_file(path, data, pool, way == "drop") for path in paths]
                for path in paths:
                    os.remove(path)
                totals[way].append(sum(wall for wall, _ in results))
                cells = ", ".join(f"{wall:.2f} ({system:.2f})" for wall, system in results)
                print(f"round {r + 1} {way}: {cells}", flush=True)
    keep, drop = sum(totals["keep"]), sum(totals["drop"])
    print(f"all files: keep {keep:.2f} s, drop {drop:.2f} s, drop / keep {drop / keep:.2f}x")


if __name__ == "__main__":
    main()
