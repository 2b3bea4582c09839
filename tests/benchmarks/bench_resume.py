"""Resume on Ray: time from ``fit(ckpt_path=...)`` to the first training step, vs a fresh start.

    python tests/benchmarks/bench_resume.py [--sizes 1,512] [--workers 1] [--rounds 3] [--json out.json]

Workload, per checkpoint size S (MiB): an ``nn.Embedding`` holding S/3 of
parameters trained with Adam (a checkpoint is S: the weights and Adam's two
moments), ``Trainer(num_workers=--workers, max_epochs=2)`` against a Ray head
this script starts, 2 steps an epoch.

- ``fresh``: ``trainer.fit(model, loader)``.
- ``resume``: ``trainer.fit(model, loader, ckpt_path=<last.ckpt>)``, where
  ``last.ckpt`` was written at the end of epoch 0 by an untimed run of the
  same job before the rounds start; the run continues with epoch 1.

Timed, on one clock (both processes are on this machine): from just before
``fit()`` is called in the driver to the start of the first
``training_step`` on rank 0, each variant in its own Python process (imports
done before the clock starts), the variants interleaved round by round, the
median reported with the runs. The stages in between are stamped too, from
the module's hooks on rank 0: ``setup`` (the job has reached the worker),
``on_train_start`` (a resumed run has restored the checkpoint by then).

"load" is the time to load the same checkpoint file with raylight's loader
(``runtime.checkpoint.io.load_checkpoint``: CRC check, then
``torch.load(weights_only=True)``) in the driver process after the run, and
plain ``torch.load(weights_only=True)`` for reference. The goal is
resume <= 1.1 x fresh + load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

EMBED_DIM = 256

CHILD = r'''
import json, os, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
MODE, SIZE_MIB, WORKERS, ADDRESS, OUT, CKPT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
EMBED_DIM, STEPS, BATCH = @EMBED_DIM@, 2, 64
ROWS = max(1, SIZE_MIB * 2**20 // (3 * 4 * EMBED_DIM))

from launcher import Trainer
from runtime import LightningModule, ModelCheckpoint
from runtime.checkpoint.io import load_checkpoint
import ray.train.torch  # imported inside fit() otherwise: an import, not part of starting or resuming


class Big(LightningModule):
    def __init__(self, stamps_path):
        super().__init__()
        self.table = nn.Embedding(ROWS, EMBED_DIM)
        self.stamps_path = stamps_path
        self.stamps = {}

    def _stamp(self, name):
        if self.global_rank == 0 and name not in self.stamps:
            self.stamps[name] = time.time()
            with open(self.stamps_path, "w") as f:
                json.dump(self.stamps, f)

    def setup(self, stage):
        self._stamp("setup")

    def on_train_start(self):
        self._stamp("on_train_start")

    def training_step(self, batch, batch_idx):
        self._stamp("first_step")
        return self.table(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


g = torch.Generator().manual_seed(0)
loader = DataLoader(TensorDataset(torch.randint(0, ROWS, (WORKERS * STEPS * BATCH,), generator=g)), batch_size=BATCH)
stamps = os.path.join(OUT, "stamps.json")
model = Big(stamps)
if MODE == "prepare":
    trainer = Trainer(max_epochs=1, num_workers=WORKERS, address=ADDRESS, default_root_dir=OUT, run_name="prepare",
                      enable_progress_bar=False, logger=False, num_sanity_val_steps=0,
                      callbacks=[ModelCheckpoint(save_last=True, save_top_k=0)])
    trainer.fit(model, loader)
    os.replace(trainer.checkpoint_callback.last_model_path, CKPT)
    sys.exit(0)
trainer = Trainer(max_epochs=2, num_workers=WORKERS, address=ADDRESS, default_root_dir=OUT, run_name=MODE,
                  enable_progress_bar=False, logger=False, num_sanity_val_steps=0)
start = time.time()
trainer.fit(model, loader, ckpt_path=CKPT if MODE == "resume" else None)
end = time.time()
assert trainer.global_step == 2 * STEPS, trainer.global_step
with open(stamps) as f:
    result = {name: stamp - start for name, stamp in json.load(f).items()}
result["fit"] = end - start
loads = {"load_checkpoint": [], "torch.load": []}
for _ in range(2):
    t = time.perf_counter(); load_checkpoint(CKPT); loads["load_checkpoint"].append(time.perf_counter() - t)
    t = time.perf_counter(); torch.load(CKPT, weights_only=True); loads["torch.load"].append(time.perf_counter() - t)
result.update({name: min(times) for name, times in loads.items()}, checkpoint_bytes=os.path.getsize(CKPT))
with open(os.path.join(OUT, "result.json"), "w") as f:
    json.dump(result, f)
'''.replace("@EMBED_DIM@", str(EMBED_DIM))


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ray_head import machine, ray_head, run_child

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,512", help="checkpoint sizes in MiB")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    variants = ("fresh", "resume")
    runs: dict[tuple[int, str], list[dict]] = {(s, v): [] for s in sizes for v in variants}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with ray_head() as head, tempfile.TemporaryDirectory() as scratch:
        child = os.path.join(scratch, "child.py")
        with open(child, "w") as f:
            f.write(f"import sys\nsys.path.insert(0, {repo!r})\n" + CHILD)
        checkpoints = {}
        for size in sizes:
            checkpoints[size] = os.path.join(scratch, f"epoch0-{size}.ckpt")
            with tempfile.TemporaryDirectory(dir=scratch) as out:
                run_child([child, "prepare", str(size), str(args.workers), head.address, out, checkpoints[size]])
        for r in range(args.rounds):
            for size in sizes:
                order = variants if r % 2 == 0 else variants[::-1]
                for variant in order:
                    with tempfile.TemporaryDirectory(dir=scratch) as out:
                        run_child([child, variant, str(size), str(args.workers), head.address, out, checkpoints[size]])
                        with open(os.path.join(out, "result.json")) as f:
                            runs[(size, variant)].append(json.load(f))
                    x = runs[(size, variant)][-1]
                    print(f"round {r + 1}: {size} MiB {variant}: first step {x['first_step']:.1f} s "
                          f"(setup {x['setup']:.1f}, on_train_start {x['on_train_start']:.1f}), fit {x['fit']:.1f} s",
                          file=sys.stderr, flush=True)

    rows = []
    for size in sizes:
        fresh, resume = runs[(size, "fresh")], runs[(size, "resume")]
        med = {v: {k: statistics.median(x[k] for x in runs[(size, v)])
                   for k in ("setup", "on_train_start", "first_step", "fit")} for v in variants}
        load = statistics.median(x["load_checkpoint"] for x in resume)
        torch_load = statistics.median(x["torch.load"] for x in resume)
        bound = 1.1 * med["fresh"]["first_step"] + load
        rows.append({
            "size_mib": size,
            "checkpoint_bytes": resume[0]["checkpoint_bytes"],
            "fresh_first_step_s": med["fresh"]["first_step"],
            "resume_first_step_s": med["resume"]["first_step"],
            "fresh_runs_s": [x["first_step"] for x in fresh],
            "resume_runs_s": [x["first_step"] for x in resume],
            "ratio": med["resume"]["first_step"] / med["fresh"]["first_step"],
            "load_checkpoint_s": load,
            "torch_load_s": torch_load,
            "goal_bound_s": bound,
            "met": med["resume"]["first_step"] <= bound,
            "stages_median_s": med,
            "runs": {"fresh": fresh, "resume": resume},
        })

    info = machine()
    print(f"\nresume vs fresh start: {args.workers} Ray worker(s) on CPU, time from fit() to the first training_step, "
          f"median of {args.rounds} interleaved rounds")
    print(f"machine: {info['cpu']}, {info['logical_cpus']} CPUs, {info['memory_gib']} GiB | python {info['python']} | "
          f"torch {info['torch']} | ray {info['ray']}")
    header = (f"{'ckpt':>7} | {'fresh s':>7} {'(runs)':>16} | {'resume s':>8} {'(runs)':>16} | {'ratio':>6} | "
              f"{'load':>5} {'torch.load':>10} | {'1.1 x fresh + load':>18} | met | stages fresh / resume: setup, train start")
    print(header)
    print("-" * len(header))
    for row in rows:
        f_runs = ",".join(f"{t:.1f}" for t in row["fresh_runs_s"])
        r_runs = ",".join(f"{t:.1f}" for t in row["resume_runs_s"])
        st = row["stages_median_s"]
        print(f"{row['checkpoint_bytes'] / 2**20:5.0f}Mi | {row['fresh_first_step_s']:7.2f} {f_runs:>16} | "
              f"{row['resume_first_step_s']:8.2f} {r_runs:>16} | {row['ratio']:5.2f}x | {row['load_checkpoint_s']:5.2f} "
              f"{row['torch_load_s']:10.2f} | {row['goal_bound_s']:18.2f} | {'yes' if row['met'] else 'no':>3} | "
              f"{st['fresh']['setup']:.1f}, {st['fresh']['on_train_start']:.1f} / "
              f"{st['resume']['setup']:.1f}, {st['resume']['on_train_start']:.1f}")
    result = {"config": {"sizes_mib": sizes, "workers": args.workers, "rounds": args.rounds}, "machine": info,
              "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
