"""Per-step overhead and throughput on one GPU: raylight vs a hand-written loop vs Lightning.

Run it as a script on a machine with a CUDA GPU (pytest does not collect ``bench_*.py``)::

    python tests/benchmarks/bench_gpu.py [--precision bf16-mixed] [--steps 600] [--rounds 5] [--json out.json]

Workload, chosen so the GPU and not Python is the bottleneck: an MLP
``256 -> 4096 x 8 layers (Linear + GELU) -> 1000`` classes (139 M
parameters), batch 4096, AdamW (lr 1e-4, PyTorch's default implementation),
cross-entropy. A step is about 3.4 TFLOP of matrix products. The batches come
from a ``TensorDataset`` of 16 batches through
``DataLoader(batch_size=None, sampler=BatchSampler(...))``: each batch is one
indexing of the whole tensor, not 4096 ``__getitem__`` calls and a collate,
which would make the CPU the bottleneck and hide what a framework adds. The
batches are ordinary (pageable) host memory, copied with ``non_blocking=True``
in every variant alike; CUDA documents that such a copy may wait for the
stream while the driver stages it, so the CPU may run little ahead of the GPU,
and a framework's per-step Python time is hidden only while it is shorter
than the GPU's step.

Variants (each runs ``--rounds`` times, interleaved, the order rotated every
round, in this one process; medians are reported):

- ``raw``: the hand-written loop: move the batch with ``non_blocking=True``,
  ``zero_grad``, forward and loss under ``torch.autocast("cuda", bfloat16)``
  (for ``bf16-mixed``; none for ``32-true``), ``backward``, ``step``.
- ``raylight``: ``launcher.Trainer(num_workers=0, use_gpu=True,
  precision=..., max_steps=N, logger=False, enable_progress_bar=False,
  enable_checkpointing=False)``; ``training_step`` calls
  ``self.log("train_loss", loss)`` every step.
- ``lightning``: ``lightning.pytorch.Trainer(accelerator="gpu", devices=1,
  precision=...)`` with the same switches, on the same module body. Skipped
  with a note if Lightning is not importable.

Timed identically for every variant, wall clock with the GPU synchronized at
both ends: from just before the trainer is constructed (for ``raw``: before
the model is moved to the GPU and the optimizer built) to ``fit()`` returning
(``raw``: the loop ending). Model construction on the CPU with one seed,
``gc.collect()`` and the temp directory are outside the timing. An untimed
warm-up run of every variant (cuBLAS handles, autocast, lazy imports) comes
first. Throughput is samples per second over the whole timed run, start-up
included; ``TFLOP/s`` counts the matrix products only.

The final weights of each framework are compared with the raw loop's as a
check that every variant did the same arithmetic (``max|dw|``).

``--sync-debug`` then runs each variant once more, untimed, for ``--steps``
steps under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the
operations that made the CPU wait for the GPU: a framework that synchronizes
every step loses the CPU's lead over the GPU, which is where its per-step
Python cost would otherwise hide.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

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

SEED = 1234
BATCHES = 16
PRECISIONS = ("bf16-mixed", "32-true")


class Shape:
    def __init__(self, in_features: int, hidden: int, layers: int, classes: int, batch: int):
        self.in_features, self.hidden, self.layers, self.classes, self.batch = in_features, hidden, layers, classes, batch

    def make_net(self) -> nn.Module:
        torch.manual_seed(SEED)
        blocks: list[nn.Module] = [nn.Linear(self.in_features, self.hidden), nn.GELU()]
        for _ in range(self.layers):
            blocks += [nn.Linear(self.hidden, self.hidden), nn.GELU()]
        blocks.append(nn.Linear(self.hidden, self.classes))
        return nn.Sequential(*blocks)

    def flops_per_step(self) -> float:
        """Multiply-adds x 2 of every Linear, forward + backward (3x forward)."""
        macs = self.in_features * self.hidden + self.layers * self.hidden**2 + self.hidden * self.classes
        return 3 * 2 * self.batch * macs

    def make_loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        n = self.batch * BATCHES
        x = torch.randn(n, self.in_features, generator=g)
        y = torch.randint(0, self.classes, (n,), generator=g)
        sampler = BatchSampler(SequentialSampler(range(n)), self.batch, drop_last=True)
        return DataLoader(TensorDataset(x, y), batch_size=None, sampler=sampler, num_workers=0)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


def make_module_class(base: type, shape: Shape) -> type:
    """The same module body on top of raylight's or Lightning's ``LightningModule``."""

    class BigMLP(base):
        def __init__(self):
            super().__init__()
            self.net = shape.make_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    BigMLP.__qualname__ = f"BigMLP[{base.__module__}]"
    return BigMLP


# ---------------------------------------------------------------- variants
class Variant:
    """``prepare()`` (untimed) -> ``run()`` (timed) -> ``cleanup()`` (untimed)."""

    name = ""

    def __init__(self, steps: int, precision: str, device: str, shape: Shape, loader: DataLoader):
        self.steps, self.precision, self.device, self.shape, self.loader = steps, precision, device, shape, loader
        self.tmp: str | None = None
        self.net: nn.Module | None = None

    def prepare(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"bench_gpu_{self.name}_")

    def run(self) -> None:
        raise NotImplementedError

    def final_weights(self) -> list[torch.Tensor]:
        return [p.detach().float().cpu() for p in self.net.parameters()]

    def cleanup(self) -> None:
        self.net = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class RawLoop(Variant):
    name = "raw"

    def prepare(self) -> None:
        super().prepare()
        self.net = self.shape.make_net()

    def run(self) -> None:
        device = torch.device(self.device)
        net = self.net.to(device)
        optimizer = make_optimizer(net.parameters())
        autocast = self.precision == "bf16-mixed"
        net.train()
        step = 0
        while step < self.steps:
            for x, y in self.loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad()
                with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
                    loss = F.cross_entropy(net(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                if step >= self.steps:
                    break


class FrameworkVariant(Variant):
    """The shared module body on a framework's ``LightningModule``, fitted by that framework's Trainer."""

    def module_base(self) -> type:
        raise NotImplementedError

    def trainer(self, **switches: Any) -> Any:
        raise NotImplementedError

    def prepare(self) -> None:
        super().prepare()
        self.model = make_module_class(self.module_base(), self.shape)()
        self.net = self.model.net

    def run(self) -> None:
        trainer = self.trainer(
            precision=self.precision,
            max_steps=self.steps,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=self.tmp,
        )
        trainer.fit(self.model, self.loader)


class RaylightVariant(FrameworkVariant):
    name = "raylight"

    def module_base(self) -> type:
        return runtime.LightningModule

    def trainer(self, **switches: Any) -> Any:
        return RaylightTrainer(num_workers=0, use_gpu=self.device == "cuda", **switches)


class LightningVariant(FrameworkVariant):
    name = "lightning"

    def module_base(self) -> type:
        return pl.LightningModule

    def trainer(self, **switches: Any) -> Any:
        accelerator = "gpu" if self.device == "cuda" else "cpu"
        return pl.Trainer(accelerator=accelerator, devices=1, enable_model_summary=False, **switches)


# ---------------------------------------------------------------- harness
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(variant: Variant) -> float:
    variant.prepare()
    gc.collect()
    synchronize(variant.device)
    start = time.perf_counter()
    variant.run()
    synchronize(variant.device)
    return time.perf_counter() - start


def count_syncs(variant: Variant) -> int:
    """How many synchronizing CUDA calls ``variant.run()`` makes (PyTorch warns once per call in "warn" mode)."""
    variant.prepare()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            variant.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    variant.cleanup()
    return sum("synchroniz" in str(w.message) for w in caught)


def max_weight_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per fit (default 600)")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant (default 5)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu only to try the script")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning rows")
    parser.add_argument("--sync-debug", action="store_true", help="count each variant's GPU synchronizations")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    if args.device == "cpu" and args.sync_debug:
        parser.error("--sync-debug counts CUDA synchronizations: it needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch.cuda.is_available() is False: run this on a machine with a CUDA GPU (or --device cpu)")

    warnings.filterwarnings("ignore")  # Lightning's PossibleUserWarning about num_workers etc.
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    shape = Shape(256, args.hidden, args.layers, 1000, args.batch)
    loader = shape.make_loader()
    variant_types: list[type] = [RawLoop, RaylightVariant]
    notes: list[str] = []
    if args.no_lightning:
        notes.append("lightning rows skipped (--no-lightning)")
    elif pl is None:
        notes.append(f"lightning rows skipped: lightning is not importable ({_LIGHTNING_ERROR})")
    else:
        variant_types.append(LightningVariant)

    def make(cls: type, steps: int) -> Variant:
        return cls(steps, args.precision, args.device, shape, loader)

    for cls in variant_types:  # untimed warm-up
        warm = make(cls, min(args.steps, 20))
        timed(warm)
        warm.cleanup()

    variants = [make(cls, args.steps) for cls in variant_types]
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    weight_diffs: dict[str, float] = {}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        weights: dict[str, list[torch.Tensor]] = {}
        for v in order:
            times[v.name].append(timed(v))
            weights[v.name] = v.final_weights()
            v.cleanup()
        for name, w in weights.items():
            if name != "raw":
                weight_diffs[name] = max(weight_diffs.get(name, 0.0), max_weight_diff(w, weights["raw"]))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n}={t[-1]:.3f}s" for n, t in times.items()), file=sys.stderr)

    syncs = {v.name: count_syncs(make(type(v), args.steps)) for v in variants} if args.sync_debug else {}

    raw = statistics.median(times["raw"])
    paired = {n: [t / base for t, base in zip(ts, times["raw"])] for n, ts in times.items()}
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                "median_s": med,
                "times_s": ts,
                "ms_per_step": med / args.steps * 1e3,
                "ratio_vs_raw": med / raw,
                "paired_ratios": paired[name],
                "paired_geomean": statistics.geometric_mean(paired[name]),
                "samples_per_s": args.steps * shape.batch / med,
                "tflops": args.steps * shape.flops_per_step() / med / 1e12,
                "max_abs_weight_diff_vs_raw": weight_diffs.get(name, 0.0),
                "gpu_syncs_per_fit": syncs.get(name),
            }
        )
    result = {
        "config": {
            "precision": args.precision,
            "steps": args.steps,
            "rounds": args.rounds,
            "model": f"MLP 256-{args.hidden}x{args.layers}-1000",
            "parameters": sum(p.numel() for p in shape.make_net().parameters()),
            "batch": shape.batch,
            "tflop_per_step": shape.flops_per_step() / 1e12,
        },
        "machine": {
            "device": device_name(args.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "lightning": getattr(lightning, "__version__", None),
        },
        "results": rows,
        "notes": notes,
    }

    cfg, machine = result["config"], result["machine"]
    print(
        f"\n{args.precision}: {cfg['model']} ({cfg['parameters'] / 1e6:.0f} M params), batch {shape.batch}, "
        f"{args.steps} steps ({cfg['tflop_per_step']:.2f} TFLOP each), AdamW, median of {args.rounds} rounds"
    )
    print(f"device: {machine['device']} | torch {machine['torch']} (CUDA {machine['cuda']})"
          + (f" | lightning {machine['lightning']}" if machine["lightning"] else ""))
    header = (
        f"{'variant':<11}{'median s':>9}{'ms/step':>9}{'x raw':>8}{'paired x raw (geo mean)':>30}"
        f"{'samples/s':>11}{'TFLOP/s':>9}{'max|dw|':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        spread = f"{min(row['paired_ratios']):.3f}-{max(row['paired_ratios']):.3f} ({row['paired_geomean']:.3f})"
        print(
            f"{row['variant']:<11}{row['median_s']:>9.3f}{row['ms_per_step']:>9.2f}{row['ratio_vs_raw']:>8.3f}"
            f"{spread:>30}{row['samples_per_s']:>11.0f}{row['tflops']:>9.1f}{row['max_abs_weight_diff_vs_raw']:>10.2g}"
        )
    if syncs:
        print(f"GPU synchronizations in one {args.steps}-step fit: " + ", ".join(f"{n} {c}" for n, c in syncs.items()))
    for note in notes:
        print(f"note: {note}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
