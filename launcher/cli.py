"""The ``raylight`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from launcher.run_dir import RunDir


def _ls(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        print(f"raylight ls: no such directory: {root}", file=sys.stderr)
        return 2
    rows = []
    for name in sorted(os.listdir(root)):
        run = RunDir(os.path.join(root, name))
        if not os.path.exists(os.path.join(run.path, "spec.json")):
            continue
        status = run.read_status()
        best = status.get("best_score")
        rows.append(
            (
                name,
                status.get("status", "unknown"),
                str(status.get("epoch", "-")),
                str(status.get("global_step", "-")),
                "-" if best is None else f"{best:.6g}",
                os.path.relpath(status["last_checkpoint"], root) if status.get("last_checkpoint") else "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(status["updated"])) if "updated" in status else "-",
            )
        )
    header = ("RUN", "STATUS", "EPOCH", "STEP", "BEST", "LAST CHECKPOINT", "UPDATED")
    if args.json:
        print(json.dumps([dict(zip(header, row)) for row in rows], indent=2))
        return 0
    if not rows:
        print(f"no runs under {root}")
        return 0
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _resume(args: argparse.Namespace) -> int:
    import cloudpickle

    from launcher.job_file import JobFileError, read_job
    from runtime.checkpoint.io import CheckpointError
    from launcher.spec import SpecError, TrainerSpec
    from launcher.trainer import Trainer

    run = RunDir(os.path.abspath(args.run_dir))
    spec_path = os.path.join(run.path, "spec.json")
    if not os.path.isfile(spec_path):
        print(f"raylight resume: {run.path} is not a run directory (no spec.json)", file=sys.stderr)
        return 2
    try:
        with open(spec_path) as f:
            spec = TrainerSpec.from_json(f.read())
        record = read_job(run.path)
    except (JobFileError, SpecError) as err:
        print(f"raylight resume: {err}", file=sys.stderr)
        return 2
    job = cloudpickle.loads(record["job"])  # the signature over the whole record was verified above
    kwargs = spec.model_dump(exclude={"callbacks", "logger"})
    kwargs.update(default_root_dir=os.path.dirname(run.path), run_name=run.name, devices="auto")
    if args.address is not None:
        kwargs["address"] = args.address
    if args.num_workers is not None:
        kwargs["num_workers"] = args.num_workers
    loggers = record.get("loggers") or []
    trainer = Trainer(**kwargs, callbacks=job.callbacks, logger=loggers if loggers else False)
    checkpoint = run.last_checkpoint if os.path.exists(run.last_checkpoint) else run.read_status().get("last_checkpoint")
    if checkpoint and not os.path.exists(checkpoint):
        checkpoint = None
    print(f"resuming {run.name} from {checkpoint or 'the start (no checkpoint was committed)'}", file=sys.stderr)
    # Continue with the dead driver's seeding: PL_GLOBAL_SEED seeds the distributed sampler's shuffle on the
    # workers, and its generators start a run that had committed no checkpoint exactly as it first started.
    os.environ.update(job.seed_environment)
    if job.rng_state is not None:
        from runtime.seed import restore_rng_state

        restore_rng_state(job.rng_state)
    try:
        trainer.fit(job.module, job.train_dataloaders, job.val_dataloaders, job.datamodule, ckpt_path=checkpoint)
    except CheckpointError as err:
        print(f"raylight resume: {err}", file=sys.stderr)
        return 2
    print(f"{run.name}: finished at epoch {trainer.current_epoch}, step {trainer.global_step}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylight", description="Run LightningModules on Ray: inspect and resume runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list runs under a root directory with their status")
    ls.add_argument("root", nargs="?", default="runs", help="the default_root_dir of the runs (default: ./runs)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_ls)
    resume = sub.add_parser(
        "resume",
        help="finish a run from its run directory (spec, signed job, last checkpoint), e.g. after the driver died",
    )
    resume.add_argument("run_dir", help="the run directory: <default_root_dir>/<run_name>")
    resume.add_argument("--address", default=None, help="Ray cluster to run on (default: the run's own setting)")
    resume.add_argument("--num-workers", type=int, default=None, help="worker count (default: the run's own)")
    resume.set_defaults(func=_resume)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
