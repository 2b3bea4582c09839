"""Where the 2-rank per-step gap of ``bench_scaling.py`` comes from, without Ray: one pair of processes.

Run it as a script (pytest does not collect it)::

    python tests/benchmarks/profile_scaling.py [--steps 300] [--rounds 8] [--variants ...] [--ops]

Two gloo ranks (forked by the runtime tests' ``spawn`` helper, one torch
thread each) run the workload of ``bench_scaling.py`` (MLP 128-512-512-10,
batch 128 per rank, SGD, DDP, a ``DistributedSampler``) in several variants,
one after the other inside the same two processes, rotating the order every
round; rank 0 reports its wall time and its training thread's CPU time per
step, steps 50..``--steps``. Running every variant in the same processes
removes what differs from one process to the next on a shared VM (where the
same code swings 10-20% between processes).

Variants:

- ``hand``: the hand-written loop (``zero_grad``, forward, loss, ``backward``, ``step``).
- ``raylight``: the worker runtime (``runtime.engine.Engine``) on the same module,
  ``self.log("train_loss", loss)`` every step, as in ``bench_scaling.py``.
- ``hand+loss-in-forward``: the hand-written loop with the loss computed inside
  DDP's forward, as ``training_step`` is.
- ``hand+zero-after-forward``: gradients zeroed after the forward, before ``backward``,
  where Lightning zeroes them.
- ``hand+raylight-loader``: the loader the runtime builds (``prepare_loader``:
  its batch sampler can skip batches for an exact mid-epoch resume).
- ``hand+all-three``: all three of the above.

``--ops`` also runs the torch profiler over every round of ``hand`` and
``raylight`` on rank 0 and prints the operators whose self CPU time per step
differs most between them. The profiler slows those two variants only, so
compare the others with ``hand`` in a run without ``--ops``. Python that runs
inside DDP's forward counts as ``DistributedDataParallel.forward``'s self
time: for raylight that is all of ``training_step`` (the loss, ``self.log``),
for the hand-written loop only the model's forward.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from runtime import LightningModule  # noqa: E402
from runtime.config import RunConfig  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.loops.data import prepare_loader  # noqa: E402
from tests.runtime.distributed_helpers import spawn  # noqa: E402

BATCH, WARMUP = 128, 50
VARIANTS = ["hand", "raylight", "hand+loss-in-forward", "hand+zero-after-forward", "hand+raylight-loader",
            "hand+all-three"]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


class Clock:
    """Rank 0's wall clock and training-thread CPU time at the start of every step."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())

    def per_step_ms(self) -> tuple[float, float]:
        wall, cpu = self.wall[WARMUP:], self.cpu[WARMUP:]
        return (wall[-1] - wall[0]) / (len(wall) - 1) * 1e3, (cpu[-1] - cpu[0]) / (len(cpu) - 1) * 1e3


class Model(LightningModule):
    def __init__(self, clock: Clock):
        super().__init__()
        self.net = net()
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.tick()
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LossInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, batch):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


def run_raylight(data, steps: int, clock: Clock) -> None:
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=out)
        Engine(config).fit(Model(clock), DataLoader(data, batch_size=BATCH))


def run_hand(variant: str, rank: int, data, steps: int, clock: Clock) -> None:
    loss_in_forward = variant in ("hand+loss-in-forward", "hand+all-three")
    zero_after = variant in ("hand+zero-after-forward", "hand+all-three")
    if variant in ("hand+raylight-loader", "hand+all-three"):
        loader = prepare_loader(DataLoader(data, batch_size=BATCH), stage="train", world_size=2, rank=rank,
                                use_distributed_sampler=True, limit=1.0).loader
    else:
        loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))
    model = nn.parallel.DistributedDataParallel(LossInForward() if loss_in_forward else net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        clock.tick()
        if not zero_after:
            optimizer.zero_grad()
        loss = model(batch) if loss_in_forward else nn.functional.cross_entropy(model(batch[0]), batch[1])
        if zero_after:
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def rank_main(rank: int, out: str, variants: list[str], steps: int, rounds: int, ops: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n = 2 * steps * BATCH
    data = TensorDataset(torch.randn(n, 128, generator=g), torch.randint(0, 10, (n,), generator=g))
    results: dict[str, list] = {v: [] for v in variants}
    op_time: dict[str, collections.Counter] = {v: collections.Counter() for v in variants}
    for r in range(rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            clock = Clock()
            profiler = None
            if ops and rank == 0 and variant in ("hand", "raylight"):
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
            dist.barrier()
            if variant == "raylight":
                run_raylight(data, steps, clock)
            else:
                run_hand(variant, rank, data, steps, clock)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                for event in profiler.key_averages():
                    op_time[variant][event.key] += event.self_cpu_time_total / (steps * rounds)  # us per step
            results[variant].append(clock.per_step_ms())
    if rank == 0:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"steps": results, "ops": op_time}, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ops", action="store_true", help="torch profiler: operators of hand vs raylight")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "hand" not in variants:
        parser.error(f"--variants must include 'hand' and name only {VARIANTS}; got {unknown or variants}")
    with tempfile.TemporaryDirectory() as out:
        spawn(rank_main, out, out, variants, args.steps, args.rounds, args.ops, pg_timeout_s=600)
        with open(os.path.join(out, "results.json")) as f:
            found = json.load(f)
    steps = found["steps"]
    hand_wall = [wall for wall, _ in steps["hand"]]
    print(f"2 gloo ranks, MLP 128-512-512-10, batch {BATCH}, steps {WARMUP}..{args.steps} on rank 0, "
          f"{args.rounds} rounds in the same processes; median ms per step (per round)")
    for variant in variants:
        wall = [w for w, _ in steps[variant]]
        cpu = [c for _, c in steps[variant]]
        paired = [w / h for w, h in zip(wall, hand_wall)]
        print(f"{variant:>24}: {statistics.median(wall):6.2f} ms ({', '.join(f'{w:.2f}' for w in wall)}); "
              f"training thread CPU {statistics.median(cpu):.2f} ms; / hand {statistics.median(paired):.3f}x "
              f"(slower in {sum(p > 1 for p in paired)} of {len(paired)} rounds)")
    if args.ops and "raylight" in variants:
        hand, ours = found["ops"]["hand"], found["ops"]["raylight"]
        print("\noperators by self CPU time per step, raylight - hand (us), the 15 largest differences:")
        for key in sorted(set(hand) | set(ours), key=lambda k: -abs(ours.get(k, 0) - hand.get(k, 0)))[:15]:
            print(f"  {key[:60]:60s} {hand.get(key, 0):9.1f} {ours.get(key, 0):9.1f} "
                  f"{ours.get(key, 0) - hand.get(key, 0):+9.1f}")


if __name__ == "__main__":
    main()
