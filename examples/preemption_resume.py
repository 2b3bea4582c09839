"""Preemption and resume, on a laptop: kill a training run's driver part-way, finish it, check the weights.

    python examples/preemption_resume.py                        # the walkthrough, in-process runs: ~20 s
    python examples/preemption_resume.py --resume-with fit      # finish with fit(ckpt_path="last") instead
    python examples/preemption_resume.py --num-workers 2        # each run on a local Ray, 2 workers: ~3 min
    python examples/preemption_resume.py --num-workers 2 --address auto   # on a running Ray cluster

What it does, in four steps (all under ``<root>/preemption-<time>/``):

1. ``reference``: trains examples/classifier.py's model for ``--max-steps`` steps, uninterrupted, with
   a checkpoint every 10 steps (``ModelCheckpoint(every_n_train_steps=10, save_last=True)``).
2. ``preempted``: the same training (same seed, same data, same arguments) in a child process that is
   SIGKILLed once it has committed the step-``--kill-after-step`` checkpoint, mid-epoch. Nothing in the
   child gets a chance to clean up, as when a spot machine disappears; its ``status.json`` still says
   ``running``, with the step of the newest committed checkpoint, and ``raylight ls`` shows it as
   ``preempted`` (its driver is gone). In-process runs (the default) do 1 and 2 side by side.
3. The run is finished from its run directory alone: ``raylight resume <run dir>`` reads ``spec.json``,
   the signed job file and ``checkpoints/last.ckpt``, and continues where the checkpoint stopped (the
   steps after it are recomputed). ``--resume-with fit`` instead reruns the training script with
   ``trainer.fit(model, ..., ckpt_path="last")`` and the same ``run_name``, the Lightning way.
4. The resumed run's final weights are compared with the reference's, tensor by tensor: resume is exact
   (same weights bit for bit on CPU: model, optimizer, scheduler, RNG and sampler position are all in the
   checkpoint), and ``metrics.csv`` holds every logged step once.

On a real cluster the same pieces work without you (see deploy/README.md):

- A worker node reclaimed without notice kills its workers; Ray Train restarts the worker group
  (``Trainer(max_failures=3)``), and the run continues from the driver's newest checkpoint.
- A node reclaimed with notice (a spot interruption that the cloud announces, which Ray turns into a drain
  with reason PREEMPTION and a deadline, e.g. ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``)
  makes the workers write a just-in-time ``last.ckpt`` at the next step boundary, before the node goes.
- Checkpoints are streamed to the driver's run directory, so if the driver's machine itself dies, start
  the driver again anywhere that has the run directory: ``raylight resume <run dir>`` (``--address`` and
  ``--num-workers`` may change; a checkpoint from the middle of an epoch needs the same worker count).

``--num-workers N`` runs every training on N Ray Train workers (a local Ray started by each run when no
``--address`` is given: each start costs 30-45 s on a busy 2-core machine, hence the in-process default).
With ``--address`` the runs join a running cluster (``RAY_AUTH_MODE=token``), which outlives the killed
driver. ``--step-delay`` slows each step a little, standing in for a real model, so that the kill lands
part-way through; it does not change the numbers.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # classifier.py, for the model; `python examples/...` puts it there already

CHECKPOINT_EVERY = 10


# ---------------------------------------------------------------------------------------- one training run


def train(args: argparse.Namespace) -> None:
    """One training run, the same for the reference, the preempted run and ``--resume-with fit``."""
    from classifier import DigitClassifier, digits

    from launcher import CSVLogger, TensorBoardLogger, Trainer
    from runtime import Callback, ModelCheckpoint, seed_everything

    class StepDelay(Callback):
        """Sleeps after each training batch: a stand-in for a real model's step time."""

        def __init__(self, seconds: float):
            self.seconds = seconds

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(self.seconds)

    seed_everything(7)
    train_loader, val_loader = digits()
    trainer = Trainer(
        max_steps=args.max_steps,  # a multiple of CHECKPOINT_EVERY: last.ckpt then holds the final weights
        num_workers=args.num_workers,
        address=args.address,
        default_root_dir=args.root,
        run_name=args.train,
        log_every_n_steps=1,
        enable_progress_bar=False,
        logger=[TensorBoardLogger(), CSVLogger(flush_logs_every_n_steps=1)],
        callbacks=[
            ModelCheckpoint(every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1, save_last=True),
            StepDelay(args.step_delay),
        ],
    )
    trainer.fit(DigitClassifier(), train_loader, val_loader, ckpt_path="last" if args.resume else None)
    print(f"finished at epoch {trainer.current_epoch}, step {trainer.global_step}")


# ------------------------------------------------------------------------------------------ the walkthrough


def child_command(args: argparse.Namespace, root: str, run_name: str, resume: bool = False) -> list[str]:
    command = [
        sys.executable, os.path.abspath(__file__), "--train", run_name, "--root", root,
        "--max-steps", str(args.max_steps), "--num-workers", str(args.num_workers),
        "--step-delay", str(args.step_delay),
    ]
    if args.address:
        command += ["--address", args.address]
    return command + (["--resume"] if resume else [])


def start_logged(command: list[str], log_path: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_logged(child: subprocess.Popen, log_path: str) -> None:
    if child.wait() != 0:
        with open(log_path) as log:
            sys.exit(f"`{' '.join(child.args)}` failed (exit {child.returncode}):\n{log.read()[-3000:]}")


def checkpoints_by_step(checkpoint_dir: str) -> dict[int, str]:
    """ModelCheckpoint's ``epoch=E-step=S.ckpt`` files by step (last.ckpt aside)."""
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    found = ((re.search(r"step=(\d+)\.ckpt$", name), name) for name in names)
    return {int(match.group(1)): os.path.join(checkpoint_dir, name) for match, name in found if match}


def kill_after_checkpoint(child: subprocess.Popen, run_dir: str, step: int, log_path: str, timeout: float = 600) -> int:
    """SIGKILL ``child`` once its checkpoint of ``step`` (or a later one) is committed; returns the newest step."""
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    last = os.path.join(checkpoint_dir, "last.ckpt")
    deadline = time.time() + timeout
    while True:
        saved = checkpoints_by_step(checkpoint_dir)
        newest = max(saved, default=-1)
        # ModelCheckpoint writes the step's file first, then last.ckpt (where a resume starts): wait for both.
        if newest >= step and os.path.exists(last) and os.path.getmtime(last) >= os.path.getmtime(saved[newest]):
            break
        if child.poll() is not None:
            with open(log_path) as log:
                sys.exit(f"the run ended before its step-{step} checkpoint (exit {child.returncode}); raise "
                         f"--step-delay or lower --kill-after-step:\n{log.read()[-3000:]}")
        if time.time() > deadline:
            sys.exit(f"no step-{step} checkpoint after {timeout:.0f} s; see {log_path}")
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return newest


def raylight(*argv: str) -> list[str]:
    """The `raylight` command; through this interpreter, so it works without the console script on PATH."""
    return [sys.executable, "-m", "launcher.cli", *argv]


def logged_train_steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train_loss")]


def walkthrough(args: argparse.Namespace) -> bool:
    root = os.path.abspath(os.path.join(args.root, time.strftime("preemption-%Y%m%d-%H%M%S")))
    reference, preempted = os.path.join(root, "reference"), os.path.join(root, "preempted")
    os.makedirs(root)
    where = f"on {args.num_workers} Ray workers" if args.num_workers else "in child processes"
    print(f"walkthrough directory: {root} (training runs {where})\n")

    logs = {name: os.path.join(root, f"{name}.log") for name in ("reference", "preempted", "resume")}
    children: list[subprocess.Popen] = []
    try:
        print("1/4 the uninterrupted reference run" + ("" if args.num_workers else ", alongside step 2"), flush=True)
        children.append(start_logged(child_command(args, root, "reference"), logs["reference"]))
        if args.num_workers:  # one local Ray at a time: each run starts (and stops) its own
            wait_logged(children[0], logs["reference"])
        print(f"2/4 the same run, its driver SIGKILLed once the step-{args.kill_after_step} checkpoint is "
              "committed", flush=True)
        children.append(start_logged(child_command(args, root, "preempted"), logs["preempted"]))
        newest = kill_after_checkpoint(children[1], preempted, args.kill_after_step, logs["preempted"])
        wait_logged(children[0], logs["reference"])
    finally:
        for child in children:
            if child.poll() is None:  # only when something above failed
                child.kill()
                child.wait()
    expected = torch.load(os.path.join(reference, "checkpoints", "last.ckpt"), weights_only=True)
    print(f"    reference: finished at step {expected['global_step']}")
    last = torch.load(os.path.join(preempted, "checkpoints", "last.ckpt"), weights_only=True)
    print(f"    preempted: killed after its step-{newest} checkpoint (last.ckpt: epoch {last['epoch']}, step "
          f"{last['global_step']}); the steps it did after that are lost")
    print(f"    $ raylight ls {root}")
    listing = subprocess.run(raylight("ls", root), capture_output=True, text=True)
    print("".join(f"      {line}\n" for line in listing.stdout.splitlines()))

    if args.resume_with == "raylight":
        print(f"3/4 $ raylight resume {preempted}", flush=True)
        wait_logged(start_logged(raylight("resume", preempted), logs["resume"]), logs["resume"])
    else:
        print('3/4 the training script again, with trainer.fit(..., ckpt_path="last") and the same run_name',
              flush=True)
        resume_run = start_logged(child_command(args, root, "preempted", resume=True), logs["resume"])
        wait_logged(resume_run, logs["resume"])
    with open(logs["resume"]) as log:
        print("".join(f"    {line}" for line in log if "finished" in line or "resuming" in line))

    print("4/4 compare the resumed run with the reference")
    resumed = torch.load(os.path.join(preempted, "checkpoints", "last.ckpt"), weights_only=True)
    keys = sorted(expected["state_dict"])
    different = [k for k in keys if not torch.equal(resumed["state_dict"][k], expected["state_dict"][k])]
    print(f"    the resumed run ended at step {resumed['global_step']}, the reference at step "
          f"{expected['global_step']}")
    steps = logged_train_steps(preempted)
    once = steps == sorted(set(steps)) and steps == logged_train_steps(reference)
    print(f"    metrics.csv: {len(steps)} train_loss rows, each step once and the same steps as the reference: "
          f"{'yes' if once else 'NO'}")
    same = not different and resumed["global_step"] == expected["global_step"]
    if same:
        print(f"    resumed weights equal the uninterrupted run's: yes, all {len(keys)} tensors bit for bit")
    else:
        print(f"    resumed weights equal the uninterrupted run's: NO, these differ: {different}")
    print(f"\nTensorBoard: tensorboard --logdir {root}")
    return same and once


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs", help="the walkthrough's directory goes under it (default: runs)")
    parser.add_argument("--num-workers", type=int, default=0, help="Ray Train workers per run; 0 (default): in-process")
    parser.add_argument("--address", default=None, help="Ray cluster to run on, e.g. auto (default: a local Ray)")
    parser.add_argument("--max-steps", type=int, default=60, help=f"a multiple of {CHECKPOINT_EVERY}")
    parser.add_argument("--kill-after-step", type=int, default=30, help=f"a multiple of {CHECKPOINT_EVERY}")
    parser.add_argument("--step-delay", type=float, default=0.03, help="seconds of sleep per training step")
    parser.add_argument("--resume-with", choices=("raylight", "fit"), default="raylight",
                        help='finish with `raylight resume` (default) or fit(ckpt_path="last")')
    parser.add_argument("--train", metavar="RUN_NAME", help=argparse.SUPPRESS)  # one training run, no walkthrough
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_steps % CHECKPOINT_EVERY or args.kill_after_step % CHECKPOINT_EVERY:
        parser.error(f"--max-steps and --kill-after-step must be multiples of {CHECKPOINT_EVERY} (the checkpoint "
                     f"interval), got {args.max_steps} and {args.kill_after_step}")
    if not 0 < args.kill_after_step < args.max_steps:
        parser.error(f"--kill-after-step must be between 0 and --max-steps ({args.max_steps}), got "
                     f"{args.kill_after_step}")
    if args.train:
        train(args)
    elif not walkthrough(args):
        sys.exit(1)


if __name__ == "__main__":
    main()
