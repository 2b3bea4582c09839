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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylight", description="Run LightningModules on Ray: inspect runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list runs under a root directory with their status")
    ls.add_argument("root", nargs="?", default="runs", help="the default_root_dir of the runs (default: ./runs)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
