"""Per-step time on 1 and 2 Ray Train workers: raylight vs the same loop hand-written with Ray Train.

    python tests/benchmarks/bench_scaling.py [--workers 1,2] [--rounds 3] [--steps 5000] [--warmup 8] [--json out.json] [--plot scaling.png] [--also VARIANT,...]

Needs matplotlib for the plot (``pip install matplotlib``; without it the
figures are printed and no PNG is written).

Workload, identical in both variants: an MLP 128-512-512-10 (cross-entropy,
SGD lr 0.01), batch 128 per worker, random data built on each worker and
sharded with a ``DistributedSampler``, DDP over gloo, on CPU, ``--steps`` steps per worker,
no validation, no checkpoints, no logger.

- ``raylight``: ``launcher.Trainer(num_workers=N, max_steps=steps,
  logger=False, enable_checkpointing=False, enable_progress_bar=False)``;
  ``training_step`` also calls ``self.log("train_loss", loss)`` as a module
  usually does; its ``train_dataloader()`` builds the data.
- ``handwritten``: ``ray.train.torch.TorchTrainer`` running
  ``prepare_model``/``prepare_data_loader`` and a plain loop
  (``zero_grad``, forward, loss, ``backward``, ``step``).

With ``--also``, variants of ``raylight`` that measure one of its settings in
the same run:

- ``raylight-glibc-malloc``: ``RAYLIGHT_TUNE_MALLOC=0`` on the driver, so its
  workers keep glibc's own malloc settings;
- ``raylight-ray-health-check``: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2`` on
  the driver (Ray Train's default; raylight sets 0.2 s);
- ``raylight-shipped-data``: the driver builds the dataset and passes its
  ``DataLoader`` to ``fit()``, so the data travels to the workers inside the
  job (``raylight`` builds it on each worker in ``train_dataloader()``).

What is timed: on rank 0, the wall time from the start of the first step
that starts ``--warmup`` seconds after its first step (Ray Train starts actors
of its own, a preemption watcher among them, while the first steps run) to the
start of the last step, divided by the steps in between (steady state;
start-up is measured by ``bench_ray_job.py``), and the median
of the single steps in that range (on a machine shared with other work,
bursts of someone else's load inflate the mean of a run but not its median), and
rank 0's process CPU time over the same steps (every thread of the worker
process: what each variant makes the worker do, which other load on the
machine does not change the way it changes wall time), split into its
training thread and the rest (Ray's and gloo's threads), and the whole
machine's CPU time (every process, from ``/proc/stat``), each process's CPU
time by name (from ``/proc/<pid>/stat``: where a difference outside rank 0
lands), and the time rank 0 spent in Python's garbage collector. Each variant
and worker count runs as its own Python process against one Ray head
started here, interleaved round by round; the median is reported with the
range. Goal: raylight within 5% of the hand-written loop at every size.

``--pin`` pins every worker process (all of its threads) to one core, rank r
on core r, in every variant alike, once training is about to start (raylight:
the module's ``setup``; hand-written: the top of the loop). Unpinned, the
scheduler moves the ranks' threads between cores, which makes the step time
of the same code differ from one process to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

COMMON = r'''
import gc, json, os, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
VARIANT, WORKERS, STEPS, WARMUP, ADDRESS, OUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
BATCH = 128
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
def dataset():
    g = torch.Generator().manual_seed(0)
    n = WORKERS * STEPS * BATCH
    return TensorDataset(torch.randn(n, 128, generator=g), torch.randint(0, 10, (n,), generator=g))
STAMPS = os.path.join(OUT, "stamps.json")
PIN = os.environ.get("BENCH_PIN") == "1"  # read on the driver; the workers get it inside the pickled code
def pin_to_core(rank):
    """--pin: every thread of this worker process (training, gloo, Ray's) onto core ``rank``, one core per rank."""
    core = {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), core)
        except OSError:
            pass  # the thread exited meanwhile
MACHINE, THREAD = [], []
GC = {"counting": False, "started": None, "seconds": 0.0, "collections": [0, 0, 0]}
def gc_timer(phase, info):
    """Python's garbage collections in this process (any thread) while the timed steps run."""
    if phase == "start":
        GC["started"] = time.perf_counter()
    elif GC["counting"] and GC["started"] is not None:
        GC["seconds"] += time.perf_counter() - GC["started"]
        GC["collections"][info["generation"]] += 1
def machine_busy():
    """Seconds of CPU that every process on the machine has used so far (and that the hypervisor stole)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick
PROCESSES = []
def processes_cpu():
    """CPU seconds so far of every process on this machine, by pid: (short name, seconds)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue  # exited meanwhile
        name = "rank 0" if int(pid) == os.getpid() else " ".join(os.path.basename(a) for a in argv[:2])[:50]
        out[pid] = (name or "?", (int(fields[11]) + int(fields[12])) / tick)
    return out
def stamp(stamps, cpu):
    """Rank 0, at the start of a step: the wall clock; at the first and last timed steps, this process's CPU time
    and the whole machine's, and this (the training) thread's."""
    now = time.perf_counter()
    stamps.append(now)
    if (not cpu and now - stamps[0] >= WARMUP) or (cpu and len(stamps) == STEPS):
        cpu.append(time.process_time())
        MACHINE.append(machine_busy())
        THREAD.append(time.thread_time())
        PROCESSES.append(processes_cpu())
        if len(cpu) == 1:
            gc.callbacks.append(gc_timer)
        GC["counting"] = len(cpu) == 1
def write_stamps(stamps, cpu):
    with open(STAMPS, "w") as f:
        json.dump({"stamps": stamps, "cpu": cpu, "machine": MACHINE, "thread": THREAD,
                   "gc_seconds": GC["seconds"], "gc_collections": GC["collections"],
                   "processes": by_name_delta(*PROCESSES) if len(PROCESSES) == 2 else {}}, f)
def by_name_delta(before, after):
    """CPU seconds each process name used between two snapshots (processes started meanwhile count from 0)."""
    out = {}
    for pid, (name, seconds) in after.items():
        out[name] = out.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return out
'''

RAYLIGHT = COMMON + r'''
from launcher import Trainer
from runtime import LightningModule

class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()
        self.stamps, self.cpu = [], []
    def setup(self, stage):
        if PIN:
            pin_to_core(self.global_rank)
    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH)  # built on each worker, as the hand-written loop does
    def training_step(self, batch, batch_idx):
        if self.global_rank == 0:
            stamp(self.stamps, self.cpu)
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
    def on_train_end(self):
        if self.global_rank == 0:
            write_stamps(self.stamps, self.cpu)

trainer = Trainer(max_steps=STEPS, num_workers=WORKERS, address=ADDRESS, default_root_dir=OUT, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
if os.environ.get("BENCH_SHIP_DATA") == "1":
    trainer.fit(Model(), DataLoader(dataset(), batch_size=BATCH))  # the data travels from the driver in the job
else:
    trainer.fit(Model())
assert trainer.global_step == STEPS, trainer.global_step
'''

HANDWRITTEN = COMMON + r'''
import ray, ray.train, ray.train.torch

def loop(config):
    rank = ray.train.get_context().get_world_rank()
    if PIN:
        pin_to_core(rank)
    model = ray.train.torch.prepare_model(net())
    loader = ray.train.torch.prepare_data_loader(DataLoader(dataset(), batch_size=BATCH))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stamps, cpu = [], []
    model.train()
    for step, (x, y) in enumerate(loader):
        if step >= STEPS:
            break
        if rank == 0:
            stamp(stamps, cpu)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if rank == 0:
        write_stamps(stamps, cpu)

ray.init(address=ADDRESS, log_to_driver=False)
ray.train.torch.TorchTrainer(
    loop, scaling_config=ray.train.ScalingConfig(num_workers=WORKERS),
    run_config=ray.train.RunConfig(storage_path=OUT, name="handwritten"),
).fit()
'''

VARIANTS = {"raylight": RAYLIGHT, "handwritten": HANDWRITTEN}
# --also: variant name -> (script, extra environment of its driver process).
SETTING_VARIANTS = {
    "raylight-glibc-malloc": ("raylight", {"RAYLIGHT_TUNE_MALLOC": "0"}),
    "raylight-ray-health-check": ("raylight", {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}),
    "raylight-shipped-data": ("raylight", {"BENCH_SHIP_DATA": "1"}),
}


def _median_by_name(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each process name's median CPU ms per step over the runs (0 in a run where it did not appear)."""
    names = {name for run in runs for name in run}
    return {name: statistics.median(run.get(name, 0.0) for run in runs) * 1e3 for name in sorted(names)}


def _plot(rows: list[dict], variants: list[str], path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    workers = sorted({row["workers"] for row in rows})
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs = [w + (i - (len(variants) - 1) / 2) * width for w in workers]
        cells = [next(r for r in rows if r["workers"] == w and r["variant"] == variant) for w in workers]
        meds = [c["ms_per_step"] for c in cells]
        err = [[m - c["ms_per_step_min"] for m, c in zip(meds, cells)], [c["ms_per_step_max"] - m for m, c in zip(meds, cells)]]
        left.bar(xs, meds, width, yerr=err, capsize=4, label=variant)
    left.set_xticks(workers)
    left.set_xlabel("Ray Train workers (CPU, gloo)")
    left.set_ylabel("ms per step (median, range over rounds)")
    left.set_title("per-step time")
    left.legend()
    ratios = [next(r for r in rows if r["workers"] == w and r["variant"] == "raylight")["ratio_vs_handwritten"]
              for w in workers]
    median_ratios = [next(r for r in rows if r["workers"] == w and r["variant"] == "raylight")
                     ["median_step_ratio_vs_handwritten"] for w in workers]
    right.plot(workers, ratios, "o-", label="raylight / hand-written (mean step)")
    right.plot(workers, median_ratios, "s--", label="same, median step")
    for variant in variants:
        if variant not in VARIANTS:
            right.plot(workers, [next(r for r in rows if r["workers"] == w and r["variant"] == variant)
                                 ["ratio_vs_handwritten"] for w in workers], "^:", label=f"{variant} / hand-written")
    right.axhline(1.05, color="red", linestyle="--", label="goal: 1.05")
    right.axhline(1.0, color="gray", linewidth=0.8)
    right.set_xticks(workers)
    shown = ratios + median_ratios + [r["ratio_vs_handwritten"] for r in rows if r["variant"] not in VARIANTS]
    right.set_ylim(min(0.8, min(shown) - 0.05), max(1.2, max(shown) + 0.05))
    right.set_xlabel("Ray Train workers (CPU, gloo)")
    right.set_title("ratio")
    right.legend()
    fig.suptitle("raylight vs a hand-written Ray Train loop: MLP 128-512-512-10, batch 128 per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return None


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ray_head import machine, ray_head, run_child

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5000,
                        help="steps per worker (1 worker on a fast host needs this many to run well past --warmup)")
    parser.add_argument("--warmup", type=float, default=8.0,
                        help="seconds of training not timed at the start (Ray Train starts actors of its own then)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--pin", action="store_true",
                        help="pin each worker process (all its threads) to one core, rank r on core r, in every "
                             "variant alike: less noise from the scheduler moving threads between cores")
    parser.add_argument("--plot", metavar="PNG", default="scaling.png")
    parser.add_argument("--also", default="", metavar="VARIANTS",
                        help=f"comma-separated variants of raylight's settings to run too: {', '.join(SETTING_VARIANTS)}")
    args = parser.parse_args(argv)
    sizes = [int(w) for w in args.workers.split(",") if w]
    runs = {name: (name, {}) for name in VARIANTS}
    for name in filter(None, args.also.split(",")):
        if name not in SETTING_VARIANTS:
            parser.error(f"--also {name!r}: not a variant; choose from {', '.join(SETTING_VARIANTS)}")
        runs[name] = SETTING_VARIANTS[name]
    cells = [(w, v) for w in sizes for v in runs]
    per_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    median_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    cpu_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    machine_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    thread_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    steal_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    gc_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    gc_counts: dict[tuple[int, str], list[list[int]]] = {cell: [] for cell in cells}
    process_step: dict[tuple[int, str], list[dict[str, float]]] = {cell: [] for cell in cells}
    runs_stamps: list[dict] = []  # every run's step start times, in the --json output
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with ray_head() as head, tempfile.TemporaryDirectory() as scratch:
        scripts = {}
        for name, source in VARIANTS.items():
            scripts[name] = os.path.join(scratch, f"{name}.py")
            with open(scripts[name], "w") as f:
                f.write(f"import sys\nsys.path.insert(0, {repo!r})\n" + source)
        for r in range(args.rounds):
            shift = r % len(cells)
            for workers, variant in cells[shift:] + cells[:shift]:
                with tempfile.TemporaryDirectory(dir=scratch) as out:
                    script, env = runs[variant]
                    run_child([scripts[script], script, str(workers), str(args.steps), str(args.warmup),
                               head.address, out], env={**env, "BENCH_PIN": "1" if args.pin else "0"})
                    with open(os.path.join(out, "stamps.json")) as f:
                        recorded = json.load(f)
                stamps = recorded["stamps"]
                if len(recorded["cpu"]) != 2:
                    raise SystemExit(f"{variant} x{workers}: {len(stamps)} steps took {stamps[-1] - stamps[0]:.1f} s, "
                                     f"not more than --warmup {args.warmup} s; raise --steps")
                timed = [t for t in stamps if t - stamps[0] >= args.warmup]
                runs_stamps.append({"workers": workers, "variant": variant, "round": r + 1, "stamps": stamps})
                cpu_start, cpu_end = recorded["cpu"]
                cpu_step[(workers, variant)].append((cpu_end - cpu_start) / (len(timed) - 1))
                thread_start, thread_end = recorded["thread"]
                thread_step[(workers, variant)].append((thread_end - thread_start) / (len(timed) - 1))
                (busy_start, steal_start), (busy_end, steal_end) = recorded["machine"]
                machine_step[(workers, variant)].append((busy_end - busy_start) / (len(timed) - 1))
                steal_step[(workers, variant)].append((steal_end - steal_start) / (len(timed) - 1))
                per_step[(workers, variant)].append((timed[-1] - timed[0]) / (len(timed) - 1))
                gc_step[(workers, variant)].append(recorded["gc_seconds"] / (len(timed) - 1))
                gc_counts[(workers, variant)].append(recorded["gc_collections"])
                process_step[(workers, variant)].append(
                    {name: sec / (len(timed) - 1) for name, sec in recorded["processes"].items()})
                median_step[(workers, variant)].append(statistics.median(b - a for a, b in zip(timed, timed[1:])))
                print(f"round {r + 1}: {variant} x{workers}: {per_step[(workers, variant)][-1] * 1e3:.2f} ms/step "
                      f"(median step {median_step[(workers, variant)][-1] * 1e3:.2f}, CPU "
                      f"{cpu_step[(workers, variant)][-1] * 1e3:.2f} of which the training thread "
                      f"{thread_step[(workers, variant)][-1] * 1e3:.2f}, machine CPU {machine_step[(workers, variant)][-1] * 1e3:.2f}, "
                      f"stolen {steal_step[(workers, variant)][-1] * 1e3:.2f}, Python GC "
                      f"{gc_step[(workers, variant)][-1] * 1e3:.3f} in {gc_counts[(workers, variant)][-1]} "
                      "collections by generation)", file=sys.stderr, flush=True)

    rows = []
    for workers, variant in cells:
        xs, ms, cpu = per_step[(workers, variant)], median_step[(workers, variant)], cpu_step[(workers, variant)]
        base = statistics.median(per_step[(workers, "handwritten")])
        base_median = statistics.median(median_step[(workers, "handwritten")])
        paired = [a / b for a, b in zip(xs, per_step[(workers, "handwritten")])]
        rows.append({"workers": workers, "variant": variant, "ms_per_step": statistics.median(xs) * 1e3,
                     "ms_per_step_min": min(xs) * 1e3, "ms_per_step_max": max(xs) * 1e3,
                     "ms_per_step_runs": [x * 1e3 for x in xs], "ratio_vs_handwritten": statistics.median(xs) / base,
                     "ratio_paired_runs": paired,
                     "median_step_ms": statistics.median(ms) * 1e3, "median_step_ms_runs": [x * 1e3 for x in ms],
                     "median_step_ratio_vs_handwritten": statistics.median(ms) / base_median,
                     "cpu_ms_per_step": statistics.median(cpu) * 1e3, "cpu_ms_per_step_runs": [c * 1e3 for c in cpu],
                     "cpu_ratio_vs_handwritten": statistics.median(cpu) / statistics.median(cpu_step[(workers, "handwritten")]),
                     "training_thread_cpu_ms_per_step": statistics.median(thread_step[(workers, variant)]) * 1e3,
                     "other_threads_cpu_ms_per_step": statistics.median(
                         c - t for c, t in zip(cpu, thread_step[(workers, variant)])) * 1e3,
                     "machine_cpu_ms_per_step": statistics.median(machine_step[(workers, variant)]) * 1e3,
                     "machine_cpu_ms_per_step_runs": [c * 1e3 for c in machine_step[(workers, variant)]],
                     "stolen_ms_per_step": statistics.median(steal_step[(workers, variant)]) * 1e3,
                     "gc_ms_per_step": statistics.median(gc_step[(workers, variant)]) * 1e3,
                     "gc_collections_runs": gc_counts[(workers, variant)],
                     "process_cpu_ms_per_step": _median_by_name(process_step[(workers, variant)])})
    note = _plot(rows, list(runs), args.plot) if args.plot else None

    info = machine()
    print(f"\nscaling: MLP 128-512-512-10, batch 128 per worker, {args.steps} steps, the steps after the first "
          f"{args.warmup:g} s timed on rank 0, "
          f"median of {args.rounds} interleaved rounds")
    print(f"machine: {info['cpu']}, {info['logical_cpus']} CPUs | python {info['python']} | torch {info['torch']} | "
          f"ray {info['ray']}")
    header = f"{'workers':>7} | {'hand-written ms/step (runs)':>32} | {'raylight ms/step (runs)':>32} | ratio (paired runs)"
    print(header)
    print("-" * len(header))
    by_cell = {(row["workers"], row["variant"]): row for row in rows}
    for workers in sizes:
        hand, ray_row = by_cell[(workers, "handwritten")], by_cell[(workers, "raylight")]
        fmt = lambda row: f"{row['ms_per_step']:.2f} ({', '.join(f'{t:.2f}' for t in row['ms_per_step_runs'])})"
        print(f"{workers:>7} | {fmt(hand):>32} | {fmt(ray_row):>32} | {ray_row['ratio_vs_handwritten']:.3f}x "
              f"({', '.join(f'{p:.3f}' for p in ray_row['ratio_paired_runs'])})")
    print("median step (robust to bursts of other load on a shared machine), ms, hand-written / raylight = ratio: "
          + "; ".join(f"{w} worker(s): {by_cell[(w, 'handwritten')]['median_step_ms']:.2f} / "
                      f"{by_cell[(w, 'raylight')]['median_step_ms']:.2f} = "
                      f"{by_cell[(w, 'raylight')]['median_step_ratio_vs_handwritten']:.3f}x" for w in sizes))
    print("rank 0's CPU time per step (this process, every thread: the work each variant does, whatever the "
          "machine's other load), ms, hand-written / raylight = ratio: "
          + "; ".join(f"{w} worker(s): {by_cell[(w, 'handwritten')]['cpu_ms_per_step']:.2f} / "
                      f"{by_cell[(w, 'raylight')]['cpu_ms_per_step']:.2f} = "
                      f"{by_cell[(w, 'raylight')]['cpu_ratio_vs_handwritten']:.3f}x" for w in sizes))
    print("of that, rank 0's training thread / its other threads (Ray's, gloo's), ms, hand-written; raylight: "
          + "; ".join(f"{w} worker(s): {by_cell[(w, 'handwritten')]['training_thread_cpu_ms_per_step']:.2f} / "
                      f"{by_cell[(w, 'handwritten')]['other_threads_cpu_ms_per_step']:.2f}; "
                      f"{by_cell[(w, 'raylight')]['training_thread_cpu_ms_per_step']:.2f} / "
                      f"{by_cell[(w, 'raylight')]['other_threads_cpu_ms_per_step']:.2f}" for w in sizes))
    print("the whole machine's CPU time per step (every process: the workers, the driver, Ray's own, anything else "
          "running), ms, hand-written / raylight; stolen by the hypervisor in brackets: "
          + "; ".join(f"{w} worker(s): {by_cell[(w, 'handwritten')]['machine_cpu_ms_per_step']:.2f} "
                      f"[{by_cell[(w, 'handwritten')]['stolen_ms_per_step']:.2f}] / "
                      f"{by_cell[(w, 'raylight')]['machine_cpu_ms_per_step']:.2f} "
                      f"[{by_cell[(w, 'raylight')]['stolen_ms_per_step']:.2f}]" for w in sizes))
    print("Python's garbage collections in rank 0 during the timed steps, ms per step, hand-written / raylight: "
          + "; ".join(f"{w} worker(s): {by_cell[(w, 'handwritten')]['gc_ms_per_step']:.3f} / "
                      f"{by_cell[(w, 'raylight')]['gc_ms_per_step']:.3f}" for w in sizes))
    for w in sizes:
        hand = by_cell[(w, "handwritten")]["process_cpu_ms_per_step"]
        ours = by_cell[(w, "raylight")]["process_cpu_ms_per_step"]
        busy = sorted(set(hand) | set(ours), key=lambda n: -max(hand.get(n, 0.0), ours.get(n, 0.0)))
        print(f"CPU ms per step by process, {w} worker(s), hand-written / raylight (median over rounds; processes "
              "using 0.01 ms or more): " + "; ".join(f"{n}: {hand.get(n, 0.0):.2f} / {ours.get(n, 0.0):.2f}"
                                                     for n in busy if max(hand.get(n, 0.0), ours.get(n, 0.0)) >= 0.01))
    for variant in runs:
        if variant not in VARIANTS:
            print(f"{variant} / hand-written, mean step (paired runs); raylight / {variant}: " + "; ".join(
                f"{w} worker(s): {by_cell[(w, variant)]['ratio_vs_handwritten']:.3f}x "
                f"({', '.join(f'{p:.3f}' for p in by_cell[(w, variant)]['ratio_paired_runs'])}); "
                f"{by_cell[(w, 'raylight')]['ms_per_step'] / by_cell[(w, variant)]['ms_per_step']:.3f}x"
                for w in sizes))
    print("goal: raylight within 5% of the hand-written loop (ratio <= 1.05) at every size")
    if args.plot:
        print(note or f"plot: {os.path.abspath(args.plot)}")
    result = {"config": {"workers": sizes, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
              "machine": info, "results": rows, "runs": runs_stamps}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
