"""Per-step framework overhead: raylight vs a hand-written loop vs Lightning.

Run it as a script (pytest does not collect ``bench_*.py``)::

    python tests/benchmarks/bench_step_overhead.py [--steps 2000] [--rounds 5] [--json out.json]

Workload: an MLP 32-64-10 (Linear-ReLU-Linear, cross-entropy), batch 64, plain
SGD (lr=0.01; ``--optimizer adam`` switches every variant to Adam), one CPU
thread (``torch.set_num_threads(1)``), a ``TensorDataset`` of random data in a
``DataLoader(shuffle=False, num_workers=0)`` of 250 batches per epoch, trained
for ``--steps`` optimizer steps (8 epochs at the default 2000). The model is
so small that the wall time is dominated by per-step Python overhead, which
is what this measures.

Variants (each runs ``--rounds`` times, interleaved, the order rotated every
round, all in this one process; the median is reported):

- ``raw``: the hand-written loop: iterate the DataLoader, ``zero_grad``,
  forward, loss, ``backward``, ``step``. No logging.
- ``raylight``: ``launcher.Trainer(num_workers=0, max_steps=N, logger=False,
  enable_progress_bar=False, enable_checkpointing=False)``; ``training_step``
  calls ``self.log("train_loss", loss)`` every step. The headline row.
- ``raylight_defaults``: the same module with raylight's defaults (TensorBoard
  logger into a temp dir, checkpointing on: ``last.ckpt`` at epoch ends)
  except ``enable_progress_bar=False``.
- ``lightning``: ``lightning.pytorch.Trainer(accelerator="cpu", devices=1,
  max_steps=N, logger=False, enable_checkpointing=False,
  enable_progress_bar=False, enable_model_summary=False)`` on the same module
  body (subclassing Lightning's ``LightningModule``). Skipped with a note if
  ``lightning`` is not importable.
- ``lightning_defaults`` (with ``--lightning-defaults``): Lightning's defaults
  except the progress bar and model summary, to put next to ``raylight_defaults``.

What is timed, identically for every variant (wall clock, and process CPU time
as a steadier figure on a busy machine): from just before the trainer
is constructed (for ``raw``: just before the optimizer is constructed) to
``fit()`` returning (for ``raw``: the loop ending). So the optimizer's
construction is inside the timing everywhere (the frameworks build it in
``configure_optimizers`` during fit). Outside the timing, for every variant:
all imports, building the dataset and DataLoader, building the model with the
same seed (so every variant does the same arithmetic from the same initial
weights), ``gc.collect()``, and creating/removing the temp directory. A short
untimed warm-up run of every variant precedes the rounds (first-call costs of
lazy imports and torch kernels).

The frameworks' final weights are compared with the raw loop's as a sanity
check that all variants did the same work (``max|dw|``; 0 means bit-identical).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import runtime
from launcher import Trainer as RaylightTrainer

try:
    import lightning
    import lightning.pytorch as pl

    _LIGHTNING_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    pl = None
    lightning = None
    _LIGHTNING_ERROR = f"{type(exc).__name__}: {exc}"

IN_FEATURES, HIDDEN, CLASSES = 32, 64, 10
BATCH_SIZE = 64
BATCHES_PER_EPOCH = 250
SEED = 1234


# ---------------------------------------------------------------- workload
def make_net() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def make_optimizer(params, kind: str) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.01)


def make_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = BATCH_SIZE * BATCHES_PER_EPOCH
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False, num_workers=0)


def make_module_class(base: type, optimizer_kind: str) -> type:
    """The same module body on top of raylight's or Lightning's ``LightningModule``."""

    class MLP(base):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return make_optimizer(self.parameters(), optimizer_kind)

    MLP.__qualname__ = f"MLP[{base.__module__}]"
    return MLP


# ---------------------------------------------------------------- variants
class Variant:
    """``prepare()`` (untimed) -> ``run()`` (timed) -> ``cleanup()`` (untimed)."""

    name = ""

    def __init__(self, steps: int, optimizer_kind: str, loader: DataLoader):
        self.steps, self.optimizer_kind, self.loader = steps, optimizer_kind, loader
        self.tmp: str | None = None

    def prepare(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"bench_{self.name}_")

    def run(self) -> None:
        raise NotImplementedError

    def final_weights(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class RawLoop(Variant):
    name = "raw"

    def prepare(self) -> None:
        super().prepare()
        self.net = make_net()

    def run(self) -> None:
        net, loader, steps = self.net, self.loader, self.steps
        optimizer = make_optimizer(net.parameters(), self.optimizer_kind)
        net.train()
        step = 0
        while step < steps:
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                if step >= steps:
                    break

    def final_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.net.parameters()]


class RaylightVariant(Variant):
    name = "raylight"
    defaults = False

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.module_cls = make_module_class(runtime.LightningModule, self.optimizer_kind)

    def prepare(self) -> None:
        super().prepare()
        self.model = self.module_cls()

    def trainer_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            num_workers=0, max_steps=self.steps, enable_progress_bar=False, default_root_dir=self.tmp
        )
        if not self.defaults:
            kwargs.update(logger=False, enable_checkpointing=False)
        return kwargs

    def run(self) -> None:
        trainer = RaylightTrainer(**self.trainer_kwargs())
        trainer.fit(self.model, self.loader)
        self.trainer = trainer

    def final_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.net.parameters()]


class RaylightDefaults(RaylightVariant):
    name = "raylight_defaults"
    defaults = True


class LightningVariant(Variant):
    name = "lightning"
    defaults = False

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.module_cls = make_module_class(pl.LightningModule, self.optimizer_kind)

    def prepare(self) -> None:
        super().prepare()
        self.model = self.module_cls()

    def trainer_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            accelerator="cpu",
            devices=1,
            max_steps=self.steps,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=self.tmp,
        )
        if not self.defaults:
            kwargs.update(logger=False, enable_checkpointing=False)
        return kwargs

    def run(self) -> None:
        trainer = pl.Trainer(**self.trainer_kwargs())
        trainer.fit(self.model, self.loader)

    def final_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.net.parameters()]


class LightningDefaults(LightningVariant):
    name = "lightning_defaults"
    defaults = True


# ---------------------------------------------------------------- harness
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(variant: Variant) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``variant.run()``."""
    variant.prepare()
    gc.collect()
    cpu_start = time.process_time()
    start = time.perf_counter()
    variant.run()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return elapsed, cpu


def max_weight_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per fit (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant (default 5)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning rows")
    parser.add_argument(
        "--lightning-defaults", action="store_true", help="add a Lightning row with its default logger/checkpointing"
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each variant")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Lightning's PossibleUserWarning about num_workers etc.
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    loader = make_loader()
    variant_types: list[type] = [RawLoop, RaylightVariant, RaylightDefaults]
    notes: list[str] = []
    if args.no_lightning:
        notes.append("lightning rows skipped (--no-lightning)")
    elif pl is None:
        notes.append(f"lightning rows skipped: lightning is not importable ({_LIGHTNING_ERROR})")
    else:
        variant_types.append(LightningVariant)
        if args.lightning_defaults:
            variant_types.append(LightningDefaults)
    variants = [cls(args.steps, args.optimizer, loader) for cls in variant_types]

    if not args.no_warmup:
        warm_steps = min(args.steps, 50)
        for v in variants:
            w = type(v)(warm_steps, args.optimizer, loader)
            timed(w)
            w.cleanup()

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v.name: [] for v in variants}
    weight_diffs: dict[str, float] = {}
    n = len(variants)
    for r in range(args.rounds):
        order = variants[r % n:] + variants[: r % n]
        round_weights: dict[str, list[torch.Tensor]] = {}
        for v in order:
            wall, cpu = timed(v)
            times[v.name].append(wall)
            cpu_times[v.name].append(cpu)
            round_weights[v.name] = v.final_weights()
            v.cleanup()
        for name, w in round_weights.items():
            if name != "raw":
                weight_diffs[name] = max(weight_diffs.get(name, 0.0), max_weight_diff(w, round_weights["raw"]))
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v.name}={times[v.name][-1]:.3f}s (cpu {cpu_times[v.name][-1]:.3f}s)" for v in variants),
            file=sys.stderr,
        )

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_medians = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    raw = medians["raw"]
    raw_cpu = cpu_medians["raw"]
    rows = []
    for v in variants:
        med = medians[v.name]
        rows.append(
            {
                "variant": v.name,
                "median_s": med,
                "min_s": min(times[v.name]),
                "max_s": max(times[v.name]),
                "per_step_us": med / args.steps * 1e6,
                "overhead_vs_raw_us_per_step": (med - raw) / args.steps * 1e6,
                "ratio_vs_raw": med / raw,
                "max_abs_weight_diff_vs_raw": weight_diffs.get(v.name, 0.0),
                "times_s": times[v.name],
                "cpu_median_s": cpu_medians[v.name],
                "cpu_overhead_vs_raw_us_per_step": (cpu_medians[v.name] - raw_cpu) / args.steps * 1e6,
                "cpu_ratio_vs_raw": cpu_medians[v.name] / raw_cpu,
                "cpu_times_s": cpu_times[v.name],
            }
        )

    machine = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": getattr(lightning, "__version__", None),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    result = {
        "config": {
            "steps": args.steps,
            "rounds": args.rounds,
            "optimizer": args.optimizer,
            "batch_size": BATCH_SIZE,
            "batches_per_epoch": BATCHES_PER_EPOCH,
            "model": f"MLP {IN_FEATURES}-{HIDDEN}-{CLASSES}",
            "warmup": not args.no_warmup,
        },
        "machine": machine,
        "results": rows,
        "notes": notes,
    }

    print(
        f"\nstep overhead: MLP {IN_FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH_SIZE}, {args.steps} steps, "
        f"{args.optimizer}, 1 thread, median of {args.rounds} interleaved rounds"
    )
    print(f"machine: {machine['cpu']} | python {machine['python']} | torch {machine['torch']}"
          + (f" | lightning {machine['lightning']}" if machine["lightning"] else ""))
    header = (
        f"{'variant':<20}{'median s':>10}{'min s':>9}{'max s':>9}{'us/step':>10}{'+us/step':>10}{'x raw':>8}"
        f"{'cpu s':>8}{'cpu +us/st':>11}{'cpu x raw':>10}{'max|dw|':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['variant']:<20}{row['median_s']:>10.3f}{row['min_s']:>9.3f}{row['max_s']:>9.3f}"
            f"{row['per_step_us']:>10.1f}{row['overhead_vs_raw_us_per_step']:>10.1f}{row['ratio_vs_raw']:>8.2f}"
            f"{row['cpu_median_s']:>8.3f}{row['cpu_overhead_vs_raw_us_per_step']:>11.1f}{row['cpu_ratio_vs_raw']:>10.2f}"
            f"{row['max_abs_weight_diff_vs_raw']:>10.2g}"
        )
    by_name = {row["variant"]: row for row in rows}
    ours = by_name["raylight"]
    print(
        f"ours/raw       = {ours['ratio_vs_raw']:.2f}x wall ({ours['cpu_ratio_vs_raw']:.2f}x cpu); "
        f"overhead {ours['overhead_vs_raw_us_per_step']:.1f} us/step wall ({ours['cpu_overhead_vs_raw_us_per_step']:.1f} cpu)"
    )
    if "lightning" in by_name:
        light = by_name["lightning"]
        print(
            f"lightning/raw  = {light['ratio_vs_raw']:.2f}x wall ({light['cpu_ratio_vs_raw']:.2f}x cpu); "
            f"overhead {light['overhead_vs_raw_us_per_step']:.1f} us/step wall ({light['cpu_overhead_vs_raw_us_per_step']:.1f} cpu)"
        )
        print(f"ours/lightning = {ours['median_s'] / light['median_s']:.2f}x wall")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        result["machine"]["loadavg_after"] = list(load)
        if load[0] > (os.cpu_count() or 1) * 0.75:
            print(
                f"warning: load average {load[0]:.2f} on {os.cpu_count()} CPUs: other processes competed for the CPU, "
                "wall times are noisy; the cpu columns (process CPU time) are the steadier figure"
            )
    for note in notes:
        print(f"note: {note}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
