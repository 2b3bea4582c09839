"""Checkpoints from a Ray worker to the driver's run directory: time added per checkpoint, and driver-side memory.

    python tests/benchmarks/bench_checkpoint_stream.py [--sizes 64,512,2048] [--ways in-place,streamed] [--rounds 2] [--json out.json]

Workload, per checkpoint size S (MiB): a 1-worker raylight run on CPU
(``Trainer(num_workers=1)``, against a Ray head this script starts) of an
``nn.Embedding`` holding S/3 of parameters, trained with Adam, so a
checkpoint is S (the weights plus Adam's two moments, created on the worker
as a real optimizer's are; the model itself is shipped to the worker and
back, the moments never are). 2 steps an epoch, ``2 x --checkpoints``
epochs; ``ModelCheckpoint(every_n_epochs=2, save_top_k=-1)`` saves after
every second epoch, so checkpoint epochs and plain epochs alternate in the
same run (every file is kept: deleting the previous one is a cost of top-k
bookkeeping, not of moving a checkpoint).

Two ways, each its own run: ``in-place``, what this worker does by default
(it runs on the driver's node, sees the run directory, and ``torch.save``s
into it; the sink actor commits the file), and ``streamed``, what a worker on
another node does (``RAYLIGHT_STREAM_FILES=1`` makes this one do it: the
checkpoint goes in chunks through Ray's object store to the sink actor, which
writes it).

Figures, measured in the same run:

- added fit time per checkpoint: on the worker, the time from the module's
  ``on_train_epoch_end`` to the next ``on_train_epoch_start`` (or
  ``on_train_end``), median over the checkpoint epochs minus the median over
  the plain epochs: building the dict and ``torch.save`` into the driver's run
  directory (in place, or in chunks through the sink actor). The sink actor
  commits the file (fsync, rename) while training goes on; the next
  checkpoint waits for that commit, and the run's end waits for the last one.
- local ``torch.save``: after training, the worker ``torch.save``s the last
  checkpoint dict it built (``on_save_checkpoint`` hands it over) to a local
  file, on the same disk; the better of two tries, without fsync (the cheapest
  local save, the fair denominator), and with fsync for reference.
- driver peak memory: the driver process's resident set sampled every 10 ms
  by a thread (psutil), as the peak above its size just before ``fit()`` (the
  model already built, Ray Train imported), and the sink actor's (the
  driver-node process that receives the chunks) peak above its size when
  first seen, both relative to S; "maxrss" is the kernel's high-water mark of
  the driver (``getrusage``) above the same starting point. "private" is the
  same peak for the resident set minus its shared pages: pages of the object
  store's shared memory that a process touched (the job it ``ray.put``, the
  chunks the sink reads) count in its resident set but belong to the store. The
  driver also pickles the job (the model) and receives the final weights, so
  its figure includes the S/3 model twice over.

Each size and way runs in its own Python process; they are interleaved round
by round. The machine needs roughly 5 x S of free memory for the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

MIB = 2**20
# The environment each way's run gets.
WAYS = {"in-place": {}, "streamed": {"RAYLIGHT_STREAM_FILES": "1"}}
EMBED_DIM = 256
STEPS_PER_EPOCH, BATCH = 2, 64

CHILD = r'''
import json, os, sys, tempfile, threading, time
import psutil, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
SIZE_MIB, CHECKPOINTS, ADDRESS, OUT, HEAD_PID = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
EMBED_DIM, STEPS_PER_EPOCH, BATCH = @EMBED_DIM@, @STEPS_PER_EPOCH@, @BATCH@
ROWS = SIZE_MIB * 2**20 // (3 * 4 * EMBED_DIM)

from launcher import Trainer
from runtime import LightningModule, ModelCheckpoint


class Big(LightningModule):
    def __init__(self, stamps_path):
        super().__init__()
        self.table = nn.Embedding(ROWS, EMBED_DIM)
        self.stamps_path = stamps_path
        self.events = []
        self.last_checkpoint = None

    def training_step(self, batch, batch_idx):
        return self.table(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_train_epoch_start(self):
        self.events.append(("start", self.current_epoch, time.perf_counter()))

    def on_train_epoch_end(self):
        self.events.append(("end", self.current_epoch, time.perf_counter()))

    def on_save_checkpoint(self, checkpoint):
        self.last_checkpoint = checkpoint

    def on_train_end(self):
        self.events.append(("train_end", self.current_epoch, time.perf_counter()))
        if self.global_rank != 0:
            return
        local = {"plain": [], "fsync": []}
        for kind in ("plain", "fsync", "plain", "fsync"):
            fd, path = tempfile.mkstemp(suffix=".ckpt")
            os.close(fd)
            start = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(self.last_checkpoint, f)
                if kind == "fsync":
                    f.flush()
                    os.fsync(f.fileno())
            local[kind].append(time.perf_counter() - start)
            size = os.path.getsize(path)
            os.remove(path)
        self.last_checkpoint = None
        with open(self.stamps_path, "w") as f:
            json.dump({"events": self.events, "local_save": local, "checkpoint_bytes": size}, f)


class Sampler:
    """Peak memory of this process and of the sink actor, sampled on a thread.

    Two measures each: the resident set, and its private part (resident minus shared: the object
    store's shared memory pages a process touched count in its resident set, but belong to the store).
    """

    def __init__(self):
        self.me = psutil.Process()
        self.peak = {"driver_rss": 0, "driver_private": 0, "sink_rss": 0, "sink_private": 0}
        self.idle_sink = None  # the sink actor's (rss, private) when first seen, before any checkpoint
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.sample(self.me, "driver")

    def sample(self, process, who):
        info = process.memory_info()
        rss, private = info.rss, info.rss - info.shared
        self.peak[who + "_rss"] = max(self.peak[who + "_rss"], rss)
        self.peak[who + "_private"] = max(self.peak[who + "_private"], private)
        return rss, private

    def run(self):
        head = psutil.Process(HEAD_PID)
        sinks, looked = [], 0.0
        while not self.stop.wait(0.01):
            self.sample(self.me, "driver")
            if time.monotonic() - looked > 0.5:
                looked = time.monotonic()
                sinks = []
                for p in head.children(recursive=True):
                    try:
                        if "DriverSink" in " ".join(p.cmdline()):
                            sinks.append(p)
                    except psutil.Error:
                        pass
            for p in sinks:
                try:
                    seen = self.sample(p, "sink")
                    self.idle_sink = seen if self.idle_sink is None else self.idle_sink
                except psutil.Error:
                    pass


g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randint(0, ROWS, (STEPS_PER_EPOCH * BATCH,), generator=g))
stamps = os.path.join(OUT, "stamps.json")
model = Big(stamps)
trainer = Trainer(max_epochs=2 * CHECKPOINTS, num_workers=1, address=ADDRESS, default_root_dir=OUT,
                  enable_progress_bar=False, logger=False, num_sanity_val_steps=0,
                  callbacks=[ModelCheckpoint(every_n_epochs=2, save_top_k=-1)])
import ray.train.torch  # imported inside fit() otherwise: its ~100 MiB are not the checkpoint's
info = psutil.Process().memory_info()
before, before_private = info.rss, info.rss - info.shared
sampler = Sampler()
sampler.thread.start()
start = time.perf_counter()
trainer.fit(model, DataLoader(data, batch_size=BATCH))
fit_s = time.perf_counter() - start
sampler.stop.set()
sampler.thread.join()
import resource
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(stamps) as f:
    result = json.load(f)
idle_sink = sampler.idle_sink or (0, 0)
result.update(fit_s=fit_s, driver_rss_before=before, driver_private_before=before_private, driver_maxrss=maxrss,
              sink_rss_idle=idle_sink[0], sink_private_idle=idle_sink[1], model_bytes=ROWS * EMBED_DIM * 4,
              **{"peak_" + k: v for k, v in sampler.peak.items()})
with open(os.path.join(OUT, "result.json"), "w") as f:
    json.dump(result, f)
'''.replace("@EMBED_DIM@", str(EMBED_DIM)).replace("@STEPS_PER_EPOCH@", str(STEPS_PER_EPOCH)).replace("@BATCH@", str(BATCH))


def _gaps(events: list) -> tuple[list[float], list[float]]:
    """(epoch-end gaps after a checkpoint epoch, gaps after a plain epoch), in seconds."""
    checkpoint_gaps, plain_gaps = [], []
    for i, (kind, epoch, stamp) in enumerate(events):
        if kind != "end" or i + 1 >= len(events):
            continue
        gap = events[i + 1][2] - stamp
        (checkpoint_gaps if (epoch + 1) % 2 == 0 else plain_gaps).append(gap)
    return checkpoint_gaps, plain_gaps


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ray_head import machine, ray_head, run_child

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,512,2048", help="checkpoint sizes in MiB")
    parser.add_argument("--ways", default="in-place,streamed", help="in-place, streamed or both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run (twice as many epochs)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ways = [w for w in args.ways.split(",") if w]
    unknown = set(ways) - set(WAYS)
    if unknown:
        parser.error(f"--ways: unknown {sorted(unknown)}; choose from {list(WAYS)}")
    cells = [(size, way) for size in sizes for way in ways]

    runs: dict[tuple[int, str], list[dict]] = {cell: [] for cell in cells}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with ray_head() as head, tempfile.TemporaryDirectory() as scratch:
        child = os.path.join(scratch, "child.py")
        with open(child, "w") as f:
            f.write(f"import sys\nsys.path.insert(0, {repo!r})\n" + CHILD)
        for r in range(args.rounds):
            order = cells if r % 2 == 0 else cells[::-1]
            for size, way in order:
                with tempfile.TemporaryDirectory(dir=scratch) as out:
                    run_child([child, str(size), str(args.checkpoints), head.address, out, str(head.process.pid)],
                              env=WAYS[way])
                    with open(os.path.join(out, "result.json")) as f:
                        result = json.load(f)
                result["checkpoint_gaps"], result["plain_gaps"] = _gaps(result.pop("events"))
                runs[(size, way)].append(result)
                added = statistics.median(result["checkpoint_gaps"]) - statistics.median(result["plain_gaps"])
                print(f"round {r + 1}: {size} MiB {way}: added {added:.2f} s/checkpoint, local torch.save "
                      f"{min(result['local_save']['plain']):.2f} s, fit {result['fit_s']:.1f} s", file=sys.stderr,
                      flush=True)

    rows = []
    for size, way in cells:
        xs = runs[(size, way)]
        added = [statistics.median(x["checkpoint_gaps"]) - statistics.median(x["plain_gaps"]) for x in xs]
        local = [min(x["local_save"]["plain"]) for x in xs]
        local_fsync = [min(x["local_save"]["fsync"]) for x in xs]
        ratios = [a / b for a, b in zip(added, local)]
        ckpt = statistics.median(x["checkpoint_bytes"] for x in xs)
        def grown(peak: str, start: str) -> list[float]:
            return [(x[peak] - x[start]) / x["checkpoint_bytes"] for x in xs]

        driver_rss = grown("peak_driver_rss", "driver_rss_before")
        driver_private = grown("peak_driver_private", "driver_private_before")
        maxrss_added = grown("driver_maxrss", "driver_rss_before")
        sink_rss = grown("peak_sink_rss", "sink_rss_idle")
        sink_private = grown("peak_sink_private", "sink_private_idle")
        rows.append({
            "size_mib": size,
            "way": way,
            "checkpoint_bytes": ckpt,
            "model_bytes": xs[0]["model_bytes"],
            "added_s_per_checkpoint": statistics.median(added),
            "added_s_runs": added,
            "local_torch_save_s": statistics.median(local),
            "local_torch_save_fsync_s": statistics.median(local_fsync),
            "ratio_vs_local_save": statistics.median(ratios),
            "ratio_runs": ratios,
            "ratio_vs_local_save_fsync": statistics.median(a / b for a, b in zip(added, local_fsync)),
            "driver_peak_rss_added_x_checkpoint": statistics.median(driver_rss),
            "driver_peak_rss_added_runs": driver_rss,
            "driver_peak_private_added_x_checkpoint": statistics.median(driver_private),
            "driver_maxrss_added_x_checkpoint": statistics.median(maxrss_added),
            "sink_peak_rss_added_x_checkpoint": statistics.median(sink_rss),
            "sink_peak_private_added_x_checkpoint": statistics.median(sink_private),
            "fit_s": [x["fit_s"] for x in xs],
            "runs": xs,
        })

    info = machine()
    print(f"\ncheckpoints: 1 Ray worker (CPU) -> driver's run directory, Adam on an nn.Embedding, "
          f"{args.checkpoints} checkpoints per run, median of {args.rounds} rounds")
    print(f"machine: {info['cpu']}, {info['logical_cpus']} CPUs, {info['memory_gib']} GiB | python {info['python']} | "
          f"torch {info['torch']} | ray {info['ray']}")
    header = (f"{'size':>9} {'way':>8} | {'added s/ckpt':>12} {'(runs)':>16} | {'local save':>10} {'+fsync':>7} | "
              f"{'ratio':>6} {'(runs)':>12} | {'driver peak +':>13} {'private':>7} {'maxrss':>7} | "
              f"{'sink peak +':>11} {'private':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        runs_text = ",".join(f"{a:.2f}" for a in row["added_s_runs"])
        ratio_text = ",".join(f"{a:.2f}" for a in row["ratio_runs"])
        print(f"{row['checkpoint_bytes'] / MIB:7.0f}Mi {row['way']:>8} | {row['added_s_per_checkpoint']:12.2f} {runs_text:>16} | "
              f"{row['local_torch_save_s']:10.2f} {row['local_torch_save_fsync_s']:7.2f} | "
              f"{row['ratio_vs_local_save']:5.2f}x {ratio_text:>12} | "
              f"{row['driver_peak_rss_added_x_checkpoint']:12.2f}x {row['driver_peak_private_added_x_checkpoint']:6.2f}x "
              f"{row['driver_maxrss_added_x_checkpoint']:6.2f}x | {row['sink_peak_rss_added_x_checkpoint']:10.2f}x "
              f"{row['sink_peak_private_added_x_checkpoint']:6.2f}x")
    print("goals: added time per checkpoint <= 2.0x a local torch.save; driver peak <= 1.5x the checkpoint size")
    result = {"config": {"sizes_mib": sizes, "ways": ways, "rounds": args.rounds, "checkpoints": args.checkpoints, "workers": 1},
              "machine": info, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
