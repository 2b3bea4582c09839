"""The ``raylight`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

from launcher.run_dir import RunDir


def _ls(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        print(f"raylight ls: no such directory: {root}", file=sys.stderr)
        return 2
    runs = [RunDir(os.path.join(root, name)) for name in sorted(os.listdir(root))]
    runs = [run for run in runs if os.path.exists(os.path.join(run.path, "spec.json"))]
    if args.json:
        print(json.dumps([_ls_record(run) for run in runs], indent=2))
        return 0
    rows = []
    for run in runs:
        status = run.read_status()
        best = status.get("best_score")
        rows.append(
            (
                run.name,
                run.shown_status(),
                str(status.get("epoch", "-")),
                str(status.get("global_step", "-")),
                "-" if best is None else f"{best:.6g}",
                os.path.relpath(status["last_checkpoint"], root) if status.get("last_checkpoint") else "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(status["updated"])) if "updated" in status else "-",
            )
        )
    header = ("RUN", "STATUS", "EPOCH", "STEP", "BEST", "LAST CHECKPOINT", "UPDATED")
    if not rows:
        print(f"no runs under {root}")
        return 0
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _ls_record(run: RunDir) -> dict[str, Any]:
    """One run for ``ls --json``: status.json's values as data (null where missing), not the table's strings."""
    status = run.read_status()

    def number(key: str, kind: type) -> Any:
        value = status.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if kind is int:
            return value if isinstance(value, int) else None
        return float(value) if math.isfinite(value) else None  # NaN and inf are not JSON

    checkpoint = status.get("last_checkpoint")
    return {
        "run": run.name,
        "path": run.path,
        "status": run.shown_status(),
        "epoch": number("epoch", int),
        "global_step": number("global_step", int),
        "best_score": number("best_score", float),
        "last_checkpoint": os.path.join(run.path, checkpoint) if isinstance(checkpoint, str) and checkpoint else None,
        "updated": number("updated", float),  # seconds since the epoch (time.time())
    }


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
    if run.shown_status() == "running" and not args.force:
        driver = run.read_status().get("driver") or {}
        print(
            f"raylight resume: {run.name} is still running (its driver: pid {driver.get('pid', '?')} on "
            f"{driver.get('host', '?')}); a second driver would train into the same checkpoints and logs. Stop "
            "that driver first, or pass --force if it is gone (a host that no longer exists)",
            file=sys.stderr,
        )
        return 2
    try:
        with open(spec_path) as f:
            spec = TrainerSpec.from_json(f.read())
        record = read_job(run.path)
        job = cloudpickle.loads(record["job"])  # the signature over the whole record was verified above
        kwargs = spec.model_dump(exclude={"callbacks", "logger"})
        kwargs.update(default_root_dir=os.path.dirname(run.path), run_name=run.name, devices="auto")
        if args.address is not None:
            kwargs["address"] = args.address
        if args.num_workers is not None:
            kwargs["num_workers"] = args.num_workers
        loggers = record.get("loggers") or []
        trainer = Trainer(**kwargs, callbacks=job.callbacks, logger=loggers if loggers else False)
    except JobFileError as err:
        print(f"raylight resume: {err}", file=sys.stderr)
        return 2
    except SpecError as err:  # a damaged spec.json, or an override such as --num-workers -1
        print(f"raylight resume: {'; '.join(err.problems)}", file=sys.stderr)
        return 2
    # The newest last*.ckpt where a ModelCheckpoint keeps one, else the newest checkpoint the run recorded, else the
    # newest file in its checkpoints/ (a status.json that was lost or damaged).
    checkpoint = run.newest_last_checkpoint() or run.read_status().get("last_checkpoint")
    if not checkpoint or not os.path.exists(checkpoint):
        checkpoint = run.newest_checkpoint()
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


def _submit(args: argparse.Namespace) -> int:
    from launcher import submit

    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    working_dir = os.path.abspath(args.working_dir)
    env = submit.parse_env(args.env)
    jobs, job_id = submit.submit(args.address, command, working_dir, env=env, submission_id=args.submission_id)
    print(f"submitted job {job_id} to {args.address or 'the Ray cluster on this machine'}", flush=True)
    if args.no_wait:
        print(f"follow it with `raylight logs {job_id} --follow`, fetch its runs with `raylight fetch {job_id}`")
        return 0
    try:
        status = submit.follow(jobs, job_id, write=lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`raylight stop {job_id}` stops it)", file=sys.stderr)
        return 130
    _fetch_into(jobs, job_id, working_dir)
    print(f"job {job_id} {status.lower()}")
    return 0 if status == "SUCCEEDED" else 1


def _fetch_into(jobs, job_id: str, root: str) -> None:
    from launcher import submit

    for run in submit.fetch_runs(jobs, job_id, root):
        print(f"run directory: {run} (TensorBoard: tensorboard --logdir {run})")


def _fetch(args: argparse.Namespace) -> int:
    from launcher import submit

    _fetch_into(submit.client(args.address), args.job_id, os.path.abspath(args.dest))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from launcher import submit

    jobs = submit.client(args.address)
    if args.follow:
        submit.follow(jobs, args.job_id, write=lambda text: print(text, end="", flush=True))
    else:
        print(jobs.get_job_logs(args.job_id), end="")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from launcher import submit

    jobs = submit.client(args.address)
    jobs.stop_job(args.job_id)
    status = submit.wait(jobs, args.job_id)
    print(f"job {args.job_id}: {status.lower()}")
    return 0 if status in submit.TERMINAL else 1


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,  # resolved in _jobs_command, so that an error can say where the address came from
        help="the Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, else a "
        "Ray cluster running on this machine)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylight", description="Run LightningModules on Ray: submit jobs, inspect and resume runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser(
        "submit",
        help="run a training script on a Ray cluster as a Ray Job, follow its logs, then download its run directories",
        description="Ships --working-dir and this package to the cluster (Ray Job runtime_env), prints the job id, "
        "follows the logs, and when the job ends downloads the run directories its Trainer wrote into "
        "<working dir>/runs/ (no shared filesystem or bucket needed). Exit status 0 when the job succeeded.",
    )
    _add_address(submit)
    submit.add_argument("--working-dir", default=".", help="directory shipped to the cluster and run from (default: .)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: raylight-<random>)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- python train.py")
    submit.set_defaults(func=_submit)
    logs = sub.add_parser("logs", help="print a submitted job's logs (Ray's job logs)")
    _add_address(logs)
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=_logs)
    stop = sub.add_parser("stop", help="stop a submitted job and wait until it has stopped")
    _add_address(stop)
    stop.add_argument("job_id")
    stop.set_defaults(func=_stop)
    fetch = sub.add_parser("fetch", help="download the run directories of a submitted job (e.g. after --no-wait)")
    _add_address(fetch)
    fetch.add_argument("job_id")
    fetch.add_argument("--dest", default=".", help="where the job's working directory maps to (default: .)")
    fetch.set_defaults(func=_fetch)
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
    resume.add_argument(
        "--force", action="store_true", help="resume even though status.json says the run's driver is still running"
    )
    resume.set_defaults(func=_resume)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("submit", "logs", "stop", "fetch"):
        return _jobs_command(args)
    return args.func(args)


def _jobs_command(args: argparse.Namespace) -> int:
    """Run a Ray Jobs command; what the cluster or the SDK refuses becomes one line on stderr and exit status 2."""
    from ray.exceptions import RayError

    from launcher.submit import SubmitError, explain, resolve_address

    import ray.job_submission  # noqa: F401 - creates the SDK's loggers, quieted next

    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logging.getLogger(name).setLevel(logging.WARNING)  # not Ray's INFO lines about packages and websockets
    try:
        args.address = resolve_address(args.address)
        return args.func(args)
    except (SubmitError, ConnectionError, RayError, RuntimeError, ValueError) as err:
        print(f"raylight {args.command}: {explain(err, args.address, getattr(args, 'job_id', None))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
