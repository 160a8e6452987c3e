"""SPMD worker of the distributed tests: one process per rank (launched by dist_launcher.py).

Every rank runs the same named checks (``dist_checks_operators.py``, then
``dist_checks_errors.py``) in the same order on its shard ``data[rank::world]`` of a registry
case and records, per check, ``passed``, ``failed`` (with the traceback) or ``skipped`` (with
the reason) into a JSON file. Error-path checks assert that *this* rank raised the expected
error; the checks after them prove that the process group is still in step (no rank was left
inside a collective).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import traceback
from pathlib import Path

import dist_checks_errors  # noqa: F401 - registers the error-path checks (after the others)
import dist_checks_operators  # noqa: F401 - registers the operator checks
import torch
import torch.distributed as dist
from dist_registry import CHECKS, Ctx, Skip, checks_for

__all__ = ["checks_for"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gloo-timeout", type=float, default=60.0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=args.init_method,
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=args.gloo_timeout),
    )
    ctx = Ctx(args.rank, args.world_size)
    results = {}
    try:
        for name in checks_for(args.world_size):
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            try:
                CHECKS[name][0](ctx)
                status, message = "passed", ""
            except Skip as e:
                status, message = "skipped", str(e)
            except Exception:  # recorded, and reported by the test
                status, message = "failed", traceback.format_exc()
            results[name] = {
                "status": status,
                "message": message,
                "seconds": time.perf_counter() - start,
            }
            Path(args.out).write_text(json.dumps(results))
    finally:
        Path(args.out).write_text(json.dumps(results))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
