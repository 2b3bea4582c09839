"""Where raylight's per-step overhead goes: cProfile of one ``Trainer.fit``.

Run it as a script (pytest does not collect it)::

    python tests/benchmarks/profile_step_overhead.py [--steps 2000] [--top 25] [--defaults] [--out prof.pstats]

Same workload as ``bench_step_overhead.py`` (MLP 32-64-10, batch 64, SGD, one
thread, ``self.log("train_loss", loss)`` every step), trained by
``launcher.Trainer(num_workers=0, logger=False, enable_progress_bar=False,
enable_checkpointing=False)`` (``--defaults``: raylight's defaults except the
progress bar). An untimed 50-step warm-up fit runs first.

Prints, per optimizer step, in microseconds:

1. the functions defined under ``runtime/`` and ``launcher/`` by cumulative
   time (time inside the function and everything it calls), with their own
   (self) time and calls per step;
2. the functions anywhere (torch, contextlib, the DataLoader ...) with the most
   self time, to see which library calls the framework's code pays for.

cProfile adds roughly 0.3-1 us to every Python call it sees, so absolute
figures are inflated for call-heavy code; compare the entries with each other,
and use ``bench_step_overhead.py`` for the real overhead.

``--py-spy`` (needs the ``py-spy`` executable) samples fits instead (py-spy
pauses the process for each sample, so the shares are exact; they are scaled
to the per-step time of unsampled fits run first in this process)
and splits every sample inside the epoch loop into *work*, which the
hand-written loop does too (DataLoader ``__next__``, the user's
``training_step``, ``Tensor.backward``, ``optimizer.step``,
``optimizer.zero_grad``, the ``BatchSampler``), and *overhead*, charged to the innermost
``runtime/``/``launcher/`` function on the stack (so its share includes the
library helpers it calls: ``contextlib``, ``nn.Module.__setattr__`` ...). A
framework function called from inside a work frame (the resumable batch
sampler inside ``DataLoader.__next__``, ``self.log`` inside ``training_step``)
is overhead too, since it is the innermost of the two.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runtime  # noqa: E402
from bench_step_overhead import make_loader, make_module_class  # noqa: E402
from launcher import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = (os.path.join(REPO, "runtime") + os.sep, os.path.join(REPO, "launcher") + os.sep)


def fit(steps: int, defaults: bool, loader, profiler: cProfile.Profile | None = None) -> float:
    model = make_module_class(runtime.LightningModule, "sgd")()
    tmp = tempfile.mkdtemp(prefix="profile_step_overhead_")
    try:
        kwargs = dict(num_workers=0, max_steps=steps, enable_progress_bar=False, default_root_dir=tmp)
        if not defaults:
            kwargs.update(logger=False, enable_checkpointing=False)
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        trainer = Trainer(**kwargs)
        trainer.fit(model, loader)
        if profiler is not None:
            profiler.disable()
        return time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def short(filename: str, lineno: int, name: str) -> str:
    for root in OURS:
        if filename.startswith(root):
            return f"{os.path.relpath(filename, REPO)}:{lineno}({name})"
    if filename == "~":
        return name  # a C function, e.g. <method 'backward' ...>
    parts = filename.split(os.sep)
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[idx + 1:])}:{lineno}({name})"
    return f"{os.path.basename(filename)}:{lineno}({name})"


# Frames that start work the hand-written loop does as well (py-spy's "Class.method (file:line)" names).
_WORK = (
    re.compile(r"^_BaseDataLoaderIter\.__next__ \(torch/"),
    re.compile(r"^make_module_class\.<locals>\.MLP\.training_step "),
    re.compile(r"^Tensor\.backward \(torch/"),
    re.compile(r"^Optimizer\.profile_hook_step\.<locals>\.wrapper \(torch/"),
    re.compile(r"^Optimizer\.zero_grad \(torch/"),
    re.compile(r"^_disable_dynamo\.<locals>\.inner \(torch/"),  # torch's wrapper around zero_grad
    re.compile(r"^BatchSampler\.__iter__ \(torch/"),  # inside the resumable batch sampler
)
_MARKER = "STEP_OVERHEAD_TIMES "
_OURS_FRAME = re.compile(r"\((runtime|launcher)/")


def _target(args) -> None:
    """Child process under py-spy: warm up, then ``--repeats`` fits; their wall times as JSON on stdout."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    loader = make_loader()
    fit(min(50, args.steps), args.defaults, loader)
    times = [fit(args.steps, args.defaults, loader) for _ in range(args.repeats)]
    print(_MARKER + json.dumps({"times": times}), flush=True)


def run_py_spy(args) -> None:
    exe = shutil.which("py-spy")
    if exe is None:
        sys.exit("py-spy is not installed (pip install py-spy)")
    # The per-step time comes from unsampled fits in this process; py-spy only gives the shares.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    loader = make_loader()
    fit(min(50, args.steps), args.defaults, loader)
    plain = sorted(fit(args.steps, args.defaults, loader) for _ in range(3))[1]
    raw = tempfile.NamedTemporaryFile(prefix="step_overhead_", suffix=".txt", delete=False).name
    cmd = [
        exe, "record", "--rate", str(args.rate), "--format", "raw", "--output", raw, "--",
        sys.executable, os.path.abspath(__file__), "--_target", "--steps", str(args.steps),
        "--repeats", str(args.repeats),
    ] + (["--defaults"] if args.defaults else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"py-spy failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if not found:
        sys.exit(f"the profiled fit printed no timings:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    times = json.loads(found[-1][len(_MARKER):])["times"]

    fit_samples = 0
    epoch_samples = 0
    work = collections.Counter()
    overhead = collections.Counter()
    overhead_leaf = collections.defaultdict(collections.Counter)
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            if not any(fr.startswith("Trainer.fit (launcher/") for fr in frames):
                continue
            fit_samples += n
            if not any(fr.startswith("FitLoop._run_epoch ") for fr in frames):
                continue
            epoch_samples += n
            owner = None
            for depth in range(len(frames) - 1, -1, -1):
                fr = frames[depth]
                if any(p.match(fr) for p in _WORK):
                    owner = ("work", fr)
                    break
                if _OURS_FRAME.search(fr):
                    owner = ("ours", fr)
                    break
            if owner is None or owner[0] == "work":
                work[re.sub(r":\d+\)$", ")", owner[1]) if owner else "?"] += n
            else:
                name = re.sub(r":\d+\)$", ")", owner[1])
                overhead[name] += n
                leaf = frames[-1] if frames[-1] != owner[1] else "(self)"
                overhead_leaf[name][re.sub(r":\d+\)$", ")", leaf)] += n
    os.unlink(raw)

    plain_us = plain * 1e6 / args.steps
    per_step = lambda samples: samples / max(fit_samples, 1) * plain_us  # noqa: E731
    print(
        f"raylight fit, {args.steps} steps ({'defaults' if args.defaults else 'logger/checkpointing/progress bar off'}):"
        f" {plain:.3f}s unsampled (median of 3) = {plain_us:.1f} us/step; then {args.repeats} fits under py-spy "
        f"({args.rate} Hz: {', '.join(f'{t:.3f}s' for t in times)}), {fit_samples} samples in fit, whose shares "
        "are scaled to the unsampled time"
    )
    print(
        f"per step: {per_step(fit_samples):.1f} us in fit, {per_step(epoch_samples):.1f} us in the epoch loop = "
        f"{per_step(sum(work.values())):.1f} us work + {per_step(sum(overhead.values())):.1f} us overhead\n"
    )
    print("work (what the hand-written loop does too), per step")
    for name, n in work.most_common():
        print(f"{per_step(n):>9.1f} us  {name}")
    print(f"\noverhead by innermost runtime/ or launcher/ function, per step (top {args.top})")
    for name, n in overhead.most_common(args.top):
        leaves = ", ".join(
            f"{leaf.split(' (')[0]} {per_step(c):.1f}" for leaf, c in overhead_leaf[name].most_common(3)
        )
        print(f"{per_step(n):>9.1f} us  {name}   [{leaves}]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    parser.add_argument("--defaults", action="store_true", help="raylight's default logger and checkpointing")
    parser.add_argument("--out", metavar="PATH", help="also dump the raw pstats to PATH (snakeviz, pstats)")
    parser.add_argument("--py-spy", action="store_true", help="sample unprofiled fits with py-spy instead")
    parser.add_argument("--repeats", type=int, default=3, help="fits sampled with --py-spy (default 3)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--_target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._target:
        return _target(args)
    if args.py_spy:
        return run_py_spy(args)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    loader = make_loader()
    fit(min(50, args.steps), args.defaults, loader)  # warm-up: lazy imports, first kernel calls
    plain = fit(args.steps, args.defaults, loader)
    profiler = cProfile.Profile()
    profiled = fit(args.steps, args.defaults, loader, profiler)
    if args.out:
        profiler.dump_stats(args.out)

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (prim calls, calls, tottime, cumtime, callers)
    steps = args.steps
    per = 1e6 / steps
    total = sum(tt for _, _, tt, _, _ in stats.values())
    ours = {k: v for k, v in stats.items() if k[0].startswith(OURS)}
    ours_self = sum(v[2] for v in ours.values())

    print(
        f"raylight fit, {steps} steps ({'defaults' if args.defaults else 'logger/checkpointing/progress bar off'}): "
        f"{plain:.3f}s unprofiled ({plain * per:.1f} us/step), {profiled:.3f}s under cProfile "
        f"({total * per:.1f} us/step profiled)"
    )
    print(
        f"self time in runtime/ + launcher/ functions: {ours_self * per:.1f} us/step "
        f"({100 * ours_self / total:.1f}% of the profiled time)\n"
    )

    print(f"top {args.top} runtime/ + launcher/ functions by cumulative time, per step")
    header = f"{'cum us':>9}{'self us':>9}{'calls':>7}  function"
    print(header)
    print("-" * 100)
    for key, (_, nc, tt, ct, _) in sorted(ours.items(), key=lambda kv: -kv[1][3])[: args.top]:
        print(f"{ct * per:>9.1f}{tt * per:>9.1f}{nc / steps:>7.2f}  {short(*key)}")

    print(f"\ntop {args.top} functions anywhere by self time, per step")
    print(header)
    print("-" * 100)
    for key, (_, nc, tt, ct, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[: args.top]:
        print(f"{ct * per:>9.1f}{tt * per:>9.1f}{nc / steps:>7.2f}  {short(*key)}")


if __name__ == "__main__":
    main()
