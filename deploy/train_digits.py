"""The cluster entrypoint: examples/classifier.py's training on a Ray cluster's GPU workers.

deploy/kuberay/rayjob.yaml runs it as its Ray job and deploy/README.md runs it on the cluster-launcher
cluster. Both start it on the head node, so the run directory (``--root``) is on the head node too:

    python deploy/train_digits.py --root /home/ray/runs     # 2 GPU workers of the cluster this node is in
    python deploy/train_digits.py --cpu                      # 2 CPU workers (gloo) instead
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# The model and the data are the example's; in the image this file sits next to examples/ as in the repository.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from classifier import train  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--address", default="auto", help="Ray cluster to join (default: auto, this node's)")
    parser.add_argument("--cpu", action="store_true", help="CPU workers (gloo) instead of one GPU each (NCCL)")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="restarts after failures; a spot node reclaimed without a Ray drain counts as one (default 3)",
    )
    parser.add_argument(
        "--resource-wait-s",
        type=float,
        default=600.0,
        help="how long to wait for the worker nodes to join: a new GPU node takes minutes to boot and pull the "
        "image (default 600)",
    )
    parser.add_argument("--root", default="runs", help="default_root_dir for the run directory")
    parser.add_argument("--run-name", default=None, help="run directory name (default: a fresh one)")
    return parser


def trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Trainer`` arguments besides the callbacks (tests/deploy validates them with ``TrainerSpec``)."""
    return dict(
        max_epochs=args.max_epochs,
        num_workers=args.num_workers,
        use_gpu=not args.cpu,
        address=args.address,
        max_failures=args.max_failures,
        resource_wait_s=args.resource_wait_s,
        default_root_dir=args.root,
        run_name=args.run_name,
    )


def main(argv: list[str] | None = None) -> None:
    train(**trainer_kwargs(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
