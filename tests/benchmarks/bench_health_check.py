"""What Ray Train's health-check interval costs and buys a raylight user: start, finish and restart latency.

    python tests/benchmarks/bench_health_check.py [--intervals 0.2,0.5,1,2] [--rounds 3] [--modes job,kill,idle] [--json out.json]

Ray Train V2's controller polls the worker group every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` seconds (Ray's default is 2). That poll is
how the controller learns that training finished and that a worker died, so the
interval can add to a short run's wall time and to every restart, while each
poll costs CPU on the machine that trains. raylight sets a default
(``RAY_TRAIN_DEFAULTS`` in ``launcher/ray/backend.py``: 0.2 s); this script measures
it and the other candidates side by side, each as its own driver process against one Ray
head, rounds interleaved, medians reported:

- ``job``: a short 2-worker fit (1 epoch x 20 steps of a tiny MLP): the whole
  ``fit()`` wall, the time from ``fit()`` to rank 0's first step, and from
  rank 0's last step to ``fit()`` returning.
- ``kill``: the same fit with ``max_failures=1``, where rank 1 SIGKILLs its own
  process at step 5 of the first attempt: the time from the kill to rank 0's
  first step of the second attempt (noticing the death, tearing the group
  down, starting a new one) and the whole ``fit()`` wall.
- ``idle``: a 2-worker fit whose steps sleep 0.1 s each, over 6 s of training
  from 10 s in: the CPU time per second of Ray Train's controller process (it
  sends the polls) and of rank 0's threads other than the training thread
  (Ray's core worker answers the polls there). On a machine whose cores are
  all training, that CPU is taken from training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys, time, uuid
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from launcher import Trainer
    from runtime import LightningModule

    ADDRESS, OUT, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
    STEPS, KILL_AT = 160 if MODE == "idle" else 20, 5
    # The steps between which "idle" reads the CPU times: from 10 s into training, after the
    # actors Ray Train starts beside the workers (a preemption watcher) have settled.
    IDLE_FROM, IDLE_TO = 100, 160

    def background_cpu_s():
        # CPU seconds so far of Ray Train's controller process and of this worker's threads but the training one.
        import psutil

        controller = 0.0
        for proc in psutil.process_iter(["cmdline"]):
            if "TrainController" in " ".join(proc.info["cmdline"] or []):
                times = proc.cpu_times()
                controller += times.user + times.system
        return controller, time.process_time() - time.thread_time()

    shared = Path(OUT).parent / (Path(OUT).stem + "-records")
    shared.mkdir()

    class Probe(LightningModule):
        def __init__(self, shared, kill_at):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
            self.shared, self.kill_at = shared, kill_at
            self._attempt = None  # per copy of the module: a restart unpickles a fresh one

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2 * STEPS * 4, 8, generator=g)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

        def training_step(self, batch, batch_idx):
            now = time.time()
            shared = Path(self.shared)
            if self._attempt is None:
                (shared / f"start-{self.global_rank}-{uuid.uuid4().hex}").touch()
                self._attempt = len(list(shared.glob(f"start-{self.global_rank}-*")))
            if self.global_rank == 0:
                with open(shared / "steps-0", "a") as f:
                    f.write(f"{self._attempt} {self.global_step} {now}\\n")
                if MODE == "idle" and self.global_step in (IDLE_FROM, IDLE_TO - 1):
                    with open(shared / "busy-0", "a") as f:
                        f.write("%r %r %r\\n" % (now, *background_cpu_s()))
            if MODE == "idle":
                time.sleep(0.1)
            if self.kill_at is not None and self._attempt == 1 and self.global_rank == 1 \\
                    and self.global_step == self.kill_at:
                (shared / "killed").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = Trainer(num_workers=2, address=ADDRESS, max_epochs=1, enable_progress_bar=False,
                      max_failures=1 if MODE == "kill" else 0, logger=False,
                      enable_checkpointing=False, default_root_dir=str(shared / "run"))
    start = time.time()
    trainer.fit(Probe(str(shared), KILL_AT if MODE == "kill" else None))
    end = time.time()
    if MODE == "idle":
        (t0, ctl0, wrk0), (t1, ctl1, wrk1) = [map(float, line.split()) for line in
                                              (shared / "busy-0").read_text().splitlines()]
        record = {"controller_cpu_ms_per_s": (ctl1 - ctl0) / (t1 - t0) * 1e3,
                  "rank0_other_threads_cpu_ms_per_s": (wrk1 - wrk0) / (t1 - t0) * 1e3}
    else:
        steps = [line.split() for line in (shared / "steps-0").read_text().splitlines()]
        first = {int(a): float(t) for a, _, t in reversed(steps)}  # each attempt's first step
        last = float(steps[-1][2])
        record = {"wall_s": end - start, "to_first_step_s": first[1] - start, "last_step_to_return_s": end - last}
        if MODE == "kill":
            record["kill_to_restarted_step_s"] = first[2] - float((shared / "killed").read_text())
    with open(OUT, "w") as f:
        json.dump(record, f)
    """
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="0.2,0.5,1,2",
                        help="comma-separated RAY_TRAIN_HEALTH_CHECK_INTERVAL_S values; ratios are against the first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="job,kill,idle", help="comma-separated, from: job, kill, idle")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    intervals = [value.strip() for value in args.intervals.split(",") if value.strip()]
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or set(modes) - {"job", "kill", "idle"}:
        parser.error(f"--modes {args.modes!r}: expected a comma-separated choice of job, kill, idle")
    for value in intervals:
        if not value.replace(".", "", 1).isdigit() or float(value) <= 0:
            parser.error(f"--intervals {value!r}: expected a positive number of seconds, e.g. --intervals 0.2,1,2")

    from _ray_head import machine, ray_head, run_child

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    records: dict[str, dict[str, list[dict]]] = {v: {mode: [] for mode in modes} for v in intervals}
    with tempfile.TemporaryDirectory(prefix="bench-health-") as tmp, ray_head() as head:
        script = os.path.join(tmp, "driver.py")
        with open(script, "w") as f:
            f.write(DRIVER)
        for round_index in range(args.rounds):
            for mode in modes:
                for value in intervals:
                    out = os.path.join(tmp, f"{mode}-{value}-{round_index}.json")
                    run_child([script, head.address, out, mode], timeout=600,
                              env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": value, "PYTHONPATH": repo})
                    with open(out) as f:
                        record = json.load(f)
                    records[value][mode].append(record)
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in record.items())
                    print(f"round {round_index + 1} {mode:4s} interval {value:>4s} s: {shown}", flush=True)
        info = machine()

    summary: dict[str, dict[str, float]] = {}
    for value in intervals:
        summary[value] = {
            f"{mode}.{key}": statistics.median(r[key] for r in rows)
            for mode, rows in records[value].items() for key in rows[0]
        }
    base = intervals[0]
    print(f"\nmedians of {args.rounds} rounds ({info['cpu']}, {info['logical_cpus']} CPUs, ray {info['ray']}); "
          f"ratios against {base} s")
    keys = list(summary[base])
    print(f"{'figure':36s}" + "".join(f"{v + ' s':>16s}" for v in intervals))
    for key in keys:
        cells = "".join(f"{summary[v][key]:8.2f} ({summary[v][key] / summary[base][key]:4.2f}x)" for v in intervals)
        print(f"{key:36s}{cells}")
    result = {"machine": info, "rounds": args.rounds, "records": records, "medians": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
