"""Cost of ``self.log(..., sync_dist=True)`` on 2 ranks: raylight vs Lightning, 0 to 100 metrics per step.

Run it as a script (pytest does not collect ``bench_*.py``)::

    python tests/benchmarks/bench_sync_dist.py [--steps 200] [--rounds 3] [--metrics 0,1,10,20,100] [--json out.json]

Workload, the same for both frameworks: an MLP 32-64-10 (cross-entropy, SGD),
batch 32 per rank, 2 CPU ranks (torch.distributed gloo, one thread each),
DDP, ``max_steps`` steps of a ``DistributedSampler``-sharded ``TensorDataset``.
``training_step`` logs the loss under K names with ``sync_dist=True`` (the
training-step defaults: ``on_step=True, on_epoch=False``), K in ``--metrics``.
No logger, no checkpointing, no progress bar, no validation; ``log_every_n_steps``
is the default (50) in both. Lightning reduces every value as it is logged;
raylight reduces all of them in one collective where they are read (the
logger's steps, the epoch's end, validation, step-scheduled checkpoints).

- ``raylight``: the worker runtime (``runtime.engine.Engine``) in a process
  group this script starts, as a Ray Train worker or the runtime's own
  distributed tests run it.
- ``lightning``: ``lightning.pytorch.Trainer(accelerator="cpu", devices=2,
  strategy="ddp")`` in the same kind of externally launched process group
  (``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` set, the group already initialised).

Each measurement is a fresh pair of rank processes (forked from a server that
imported torch and lightning once); rounds are interleaved with the order
rotated every round, and the median is reported. What is timed: rank 0's wall
clock (and process CPU time, gloo's threads included) from ``on_train_start``
to ``on_train_end``, i.e. the training loop without set-up. "Added per step" is
(K metrics - 0 metrics) / steps, from the medians, and as the median of the
differences paired within a round (steadier on a busy machine).

"cpu" is the same difference in rank 0's process CPU time. "bare all_gather"
is what one ``all_gather`` of K float64 values costs between the two rank
processes, measured right after each run: the floor for any per-step sync on
this machine at that moment (it grows a lot when other processes compete for
the cores, because both ranks must be scheduled to meet).

"collector alone" is raylight's own per-step work for K synced metrics
(the ``log`` calls and reading the step's values every step, the packed
reduction every ``log_every_n_steps``) with the collective replaced by a local copy, timed in the benchmark process: the part
of the added time that is not the collective or the wait for the other rank.

Collectives are counted in the rank processes by wrapping the
``torch.distributed`` functions (``all_reduce``, ``all_gather``,
``broadcast``, ...) while the loop runs; DDP's gradient all-reduce runs in
C++ and is not among them. Nothing in the libraries is changed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
BATCH = 32
SEED = 1234
LOG_EVERY_N_STEPS = 50  # both frameworks' default
COLLECTOR_LABEL = (f"raylight's collector alone (log + step_metrics per step, sync_step per {LOG_EVERY_N_STEPS} steps, "
                   "collective stubbed, in one process), ms per step: ")
COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "gather",
    "scatter",
    "barrier",
)


# ------------------------------------------------------------------ rank side
class _Counter:
    """Counts calls to the ``torch.distributed`` functions, by name, while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.counts: dict[str, int] = {}
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            if self.active:
                self.counts[name] = self.counts.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted


def _module_body(base: type, n_metrics: int, clock: dict[str, Any], counter: _Counter) -> type:
    from torch import nn
    from torch.nn import functional as F

    names = [f"metric_{i}" for i in range(n_metrics)]

    class Model(base):
        def __init__(self):
            super().__init__()
            torch.manual_seed(SEED)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            for name in names:
                self.log(name, loss, sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_start(self):
            counter.counts.clear()
            counter.active = True
            clock["cpu0"], clock["wall0"] = time.process_time(), time.perf_counter()

        def on_train_end(self):
            clock["wall"] = time.perf_counter() - clock["wall0"]
            clock["cpu"] = time.process_time() - clock["cpu0"]
            counter.active = False

    return Model


def _loader(steps: int):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    n = WORLD_SIZE * steps * BATCH
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=BATCH)


def _run_raylight(n_metrics: int, steps: int, tmp: str, clock: dict, counter: _Counter) -> float:
    from runtime import LightningModule
    from runtime.config import RunConfig
    from runtime.engine import Engine

    model = _module_body(LightningModule, n_metrics, clock, counter)()
    engine = Engine(RunConfig(max_steps=steps, num_sanity_val_steps=0, enable_checkpointing=False,
                              default_root_dir=tmp))
    engine.fit(model, _loader(steps))
    assert engine.global_step == steps, engine.global_step
    return float(model.net[0].weight.detach().sum())


def _run_lightning(n_metrics: int, steps: int, tmp: str, clock: dict, counter: _Counter) -> float:
    import logging
    import warnings

    import lightning.pytorch as pl

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = _module_body(pl.LightningModule, n_metrics, clock, counter)()
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy="ddp", max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp)
    trainer.fit(model, _loader(steps))
    assert trainer.global_step == steps, trainer.global_step
    return float(model.net[0].weight.detach().sum())


def _bare_collective_seconds(n_values: int, repeats: int = 200) -> float:
    """What one all_gather of ``n_values`` float64s costs right now between these two processes."""
    packed = torch.zeros(max(1, n_values), dtype=torch.float64)
    out = [torch.empty_like(packed) for _ in range(WORLD_SIZE)]
    for _ in range(20):
        dist.all_gather(out, packed)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_gather(out, packed)
    return (time.perf_counter() - start) / repeats


def _rank_main(rank: int, framework: str, n_metrics: int, steps: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", GROUP_RANK="0")
    torch.set_num_threads(1)
    counter = _Counter()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    clock: dict[str, Any] = {}
    run = _run_raylight if framework == "raylight" else _run_lightning
    with tempfile.TemporaryDirectory() as tmp:
        checksum = run(n_metrics, steps, tmp, clock, counter)
    bare = _bare_collective_seconds(n_metrics)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"wall": clock["wall"], "cpu": clock["cpu"], "counts": counter.counts, "checksum": checksum,
                       "bare_all_gather": bare}, f)
    dist.destroy_process_group()


# ------------------------------------------------- the collector alone, in this process
def collector_cost_ms(n_metrics: int, iterations: int = 2000) -> float:
    """raylight's own per-step work for ``n_metrics`` synced values, with the collective replaced by a copy.

    ``n_metrics`` ``log`` calls and reading the step's values (``step_metrics``) every step, and the
    reduction (``sync_step``) every ``LOG_EVERY_N_STEPS`` (the default) steps, as the fit loop does on
    every rank of a distributed run, in one process: what is left of the added time per step once the
    collective and the wait for the other rank are taken out.
    """
    from runtime.logging.collector import MetricCollector

    collector = MetricCollector(lambda packed: torch.stack([packed] * WORLD_SIZE), training=True)
    collector.begin("training_step", batch=(torch.zeros(BATCH, 32),))
    loss = torch.tensor(1.5, requires_grad=True) * 2
    names = [f"metric_{i}" for i in range(n_metrics)]
    options = dict(prog_bar=False, logger=True, on_step=None, on_epoch=None, reduce_fx="mean", enable_graph=False,
                   sync_dist=True, add_dataloader_idx=True, batch_size=None, rank_zero_only=False)

    count = [0]

    def step() -> None:
        for name in names:
            collector.log(name, loss, **options)
        count[0] += 1
        if count[0] % LOG_EVERY_N_STEPS == 0:
            collector.sync_step()
        collector.step_metrics()

    for _ in range(iterations // 10):
        step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iterations // 5):
            step()
        times.append((time.perf_counter() - start) / (iterations // 5))
    return min(times) * 1e3


# ---------------------------------------------------------------- driver side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(framework: str, n_metrics: int, steps: int) -> dict[str, Any]:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        mp.start_processes(_rank_main, args=(framework, n_metrics, steps, _free_port(), out), nprocs=WORLD_SIZE,
                           join=True, start_method=_start_method())
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


def _start_method() -> str:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    preload = ["torch", "torch.distributed", "torch._dynamo", "runtime.engine", __name__]
    try:
        import lightning.pytorch  # noqa: F401

        preload.append("lightning.pytorch")
    except ImportError:
        pass
    multiprocessing.set_forkserver_preload(preload)
    return "forkserver"


def _cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics", default="0,1,10,20,100", help="comma-separated metric counts (0 is added)")
    parser.add_argument("--frameworks", default="raylight,lightning")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--collector-only", action="store_true",
                        help="only measure raylight's collector in this process (seconds, no ranks)")
    args = parser.parse_args(argv)
    counts = sorted({0, *(int(k) for k in args.metrics.split(",") if k)})
    torch.set_num_threads(1)
    collector_ms = {k: collector_cost_ms(k) for k in counts}
    if args.collector_only:
        print(COLLECTOR_LABEL + ", ".join(f"{k}: {v:.3f}" for k, v in collector_ms.items()))
        return {"collector_ms_per_step": collector_ms}
    frameworks = [f for f in args.frameworks.split(",") if f]
    cells = [(f, k) for f in frameworks for k in counts]

    # An untimed warm-up of each framework (first-call costs of lazy imports in the fork server).
    for framework in frameworks:
        _measure(framework, 1, 20)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {cell: [] for cell in cells}
    for r in range(args.rounds):
        shift = (r * 3) % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            runs[cell].append(_measure(*cell, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{f}/{k}={runs[(f, k)][-1]['wall'] * 1e3 / args.steps:.3f}ms" for f, k in cells), file=sys.stderr)
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):
            print(f"  note: load average {load:.1f} on {os.cpu_count()} CPUs: other processes compete", file=sys.stderr)

    rows = []
    for framework in frameworks:
        base = runs[(framework, 0)]
        base_wall = statistics.median(x["wall"] for x in base)
        base_cpu = statistics.median(x["cpu"] for x in base)
        for k in counts:
            xs = runs[(framework, k)]
            walls = [x["wall"] for x in xs]
            paired = [(x["wall"] - b["wall"]) / args.steps * 1e3 for x, b in zip(xs, base)]
            collectives = {name: n / args.steps for name, n in xs[0]["counts"].items()}
            rows.append({
                "framework": framework,
                "metrics": k,
                "ms_per_step": statistics.median(walls) / args.steps * 1e3,
                "ms_per_step_min": min(walls) / args.steps * 1e3,
                "ms_per_step_max": max(walls) / args.steps * 1e3,
                "added_ms_per_step": (statistics.median(walls) - base_wall) / args.steps * 1e3,
                "added_ms_per_step_paired": statistics.median(paired),
                "added_ms_per_step_paired_range": [min(paired), max(paired)],
                "bare_all_gather_ms": statistics.median(x["bare_all_gather"] for x in xs) * 1e3,
                "collector_only_ms_per_step": collector_ms[k] if framework == "raylight" else None,
                "cpu_added_ms_per_step": (statistics.median(x["cpu"] for x in xs) - base_cpu) / args.steps * 1e3,
                "collectives_per_step": sum(collectives.values()),
                "collectives_by_name_per_step": collectives,
                "wall_s": walls,
                "checksums": sorted({x["checksum"] for x in xs}),
            })

    machine = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__}
    try:
        import lightning

        machine["lightning"] = lightning.__version__
    except ImportError:
        pass
    print(f"\nsync_dist cost: MLP 32-64-10, batch {BATCH}/rank, {WORLD_SIZE} gloo ranks (1 thread each), "
          f"{args.steps} steps, median of {args.rounds} interleaved rounds")
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} CPUs | python {machine['python']} | "
          f"torch {machine['torch']}" + (f" | lightning {machine['lightning']}" if "lightning" in machine else ""))
    by_cell = {(row["framework"], row["metrics"]): row for row in rows}
    header = f"{'metrics':>7}" + "".join(
        f" | {f + ' ms/step':>18} {'added':>7} {'paired (range)':>22} {'cpu':>7} {'coll/step':>9}" for f in frameworks)
    header += " | bare all_gather ms"
    print(header)
    print("-" * len(header))
    for k in counts:
        line = f"{k:>7}"
        for f in frameworks:
            row = by_cell[(f, k)]
            lo, hi = row["added_ms_per_step_paired_range"]
            spread = f"{row['ms_per_step']:.3f} ({row['ms_per_step_min']:.3f}-{row['ms_per_step_max']:.3f})"
            line += (f" | {spread:>18} {row['added_ms_per_step']:+7.3f} "
                     f"{row['added_ms_per_step_paired']:+7.3f} ({lo:+.3f}..{hi:+.3f}) {row['cpu_added_ms_per_step']:+7.3f} "
                     f"{row['collectives_per_step']:9.2f}")
        line += f" | {statistics.median(by_cell[(f, k)]['bare_all_gather_ms'] for f in frameworks):.3f}"
        print(line)
    if "raylight" in frameworks and "lightning" in frameworks:
        print("\nadded time per step, raylight / Lightning: " + ", ".join(
            f"{k}: {by_cell[('raylight', k)]['added_ms_per_step_paired']:.3f} / "
            f"{by_cell[('lightning', k)]['added_ms_per_step_paired']:.3f} ms" for k in counts if k))
    print(COLLECTOR_LABEL + ", ".join(f"{k}: {v:.3f}" for k, v in collector_ms.items()))
    if ("raylight", 20) in by_cell:
        row = by_cell[("raylight", 20)]
        base_collectives = by_cell[("raylight", 0)]["collectives_per_step"]
        per_boundary = (row["collectives_per_step"] - base_collectives) * LOG_EVERY_N_STEPS
        print(f"goal (20 metrics): added <= 0.300 ms/step -> {row['added_ms_per_step_paired']:.3f} ms "
              f"(one bare all_gather costs {row['bare_all_gather_ms']:.3f} ms here); one collective per log "
              f"boundary (every {LOG_EVERY_N_STEPS} steps) -> {per_boundary:.2f} more per boundary than 0 metrics")
    result = {"config": {"steps": args.steps, "rounds": args.rounds, "batch_per_rank": BATCH,
                         "world_size": WORLD_SIZE}, "machine": machine, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
