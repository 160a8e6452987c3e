"""Speed-up of a GGN-vector product on 2 processes (gloo, CPU) over 1 process.

Problem: an MLP 64-1024-1024-10 (about 1.1M parameters) on scikit-learn's 1797 digits,
cross-entropy loss. Every configuration runs in fresh processes that rendezvous through a
file (no external services); each rank holds ``data[rank::W]``. A repeat is timed between
barriers and its time is the slowest rank's; we report the median over repeats, the
speed-up ``t(1 process) / t(W processes)``, the time of the all-reduce of a D-vector alone,
and the largest relative difference between the products of the configurations (they must
agree up to summation order).

Usage::

    python benchmarks/distributed_speedup.py                  # 1 vs 2 processes
    python benchmarks/distributed_speedup.py --repeats 11 --dtype float64

Thread settings: ``threads=1`` sets ``torch.set_num_threads(1)`` in every process (the fair
comparison: the same total number of cores per process count); ``threads=default`` leaves
PyTorch's default (one thread per core in every process, so 2 processes oversubscribe a
2-core machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


# ==================================================================== one rank
def _problem(rank: int, world_size: int, dtype: torch.dtype, batch_size: int, hidden: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=dtype) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    X, y = X[rank::world_size], y[rank::world_size]
    data = [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 10),
        )  # fmt: skip
    return model.to(dtype).eval(), data


def _time(fn, repeats: int, barrier) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this process) seconds of ``fn`` per repeat, between barriers."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - start_cpu)
        barrier()
        wall.append(time.perf_counter() - start)
    return wall, cpu


def worker(args: argparse.Namespace) -> None:
    """One rank: build the GGN of its shard, time products and the bare all-reduce."""
    from curvops import GGNLinearOperator

    if args.threads != "default":
        torch.set_num_threads(int(args.threads))
    distributed = args.world_size > 1
    if distributed:
        dist.init_process_group(
            "gloo",
            init_method=args.init_method,
            rank=args.rank,
            world_size=args.world_size,
            timeout=datetime.timedelta(seconds=600),
        )
    dtype = getattr(torch, args.dtype)
    model, data = _problem(args.rank, args.world_size, dtype, args.batch_size, args.hidden)
    params = list(model.parameters())
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    D = G.shape[1]
    v = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=dtype)
    barrier = dist.barrier if distributed else (lambda: None)
    product_times, product_cpu = _time(lambda: G @ v, args.repeats, barrier)
    buffer = torch.zeros(D, dtype=dtype)
    reduce_times = (
        _time(lambda: dist.all_reduce(buffer), args.repeats, barrier)[0] if distributed else [0.0]
    )
    result = {
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "D": D,
        "N": G.num_data,
        "product": product_times,
        "product_cpu": product_cpu,
        "all_reduce": reduce_times,
    }
    product = G @ v  # a collective: every rank multiplies
    if args.rank == 0:
        torch.save(product, args.out + ".product.pt")
    Path(args.out).write_text(json.dumps(result))
    if distributed:
        dist.destroy_process_group()


# ==================================================================== launcher
def run_config(world_size: int, threads: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Run one configuration in fresh processes; return rank 0's view and the product."""
    tag = f"w{world_size}-t{threads}"
    env = dict(os.environ)
    if threads != "default":
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    procs = []
    for rank in range(world_size):
        cmd = [
            sys.executable, __file__, "--worker", "--rank", str(rank),
            "--world-size", str(world_size), "--threads", threads,
            "--init-method", f"file://{tmp / (tag + '.rdv')}",
            "--out", str(tmp / f"{tag}-r{rank}.json"), "--repeats", str(args.repeats),
            "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--hidden", str(args.hidden),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=args.timeout) != 0:
            raise RuntimeError(f"configuration {tag}: a worker exited with {p.returncode}")
    ranks = [json.loads((tmp / f"{tag}-r{r}.json").read_text()) for r in range(world_size)]
    slowest = [max(times) for times in zip(*(r["product"] for r in ranks))]
    reduce = [max(times) for times in zip(*(r["all_reduce"] for r in ranks))]
    cpu = [max(times) for times in zip(*(r["product_cpu"] for r in ranks))]
    return {
        "world_size": world_size,
        "threads": threads,
        "threads_per_process": ranks[0]["threads"],
        "D": ranks[0]["D"],
        "N": ranks[0]["N"],
        "product_median_s": statistics.median(slowest),
        "product_all_s": slowest,
        "product_cpu_median_s": statistics.median(cpu),
        "all_reduce_median_s": statistics.median(reduce),
        "product": torch.load(tmp / f"{tag}-r0.json.product.pt"),
    }


def launch(args: argparse.Namespace) -> list[dict]:
    rows, load = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="curvops-speedup-") as tmp:
        for threads in args.thread_settings:
            for world_size in (1, args.processes):
                rows.append(run_config(world_size, threads, args, Path(tmp)))
    reference = rows[0]["product"]
    print(f"GGN-vector product, MLP 64-{args.hidden}-{args.hidden}-10 "
          f"(D = {rows[0]['D']:,}), N = {rows[0]['N']} digits, {args.dtype}, "
          f"median of {args.repeats} repeats; {os.cpu_count()} CPU cores")  # fmt: skip
    print(f"{'threads':>8} {'procs':>5} {'thr/proc':>8} {'product [s]':>12} "
          f"{'speed-up':>8} {'CPU s/rank':>10} {'all-reduce [s]':>14} "
          f"{'max rel diff':>12}")  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["threads"] == row["threads"] and r["world_size"] == 1)
        diff = (row["product"] - reference).abs().max() / reference.abs().max()
        row["speedup"] = base["product_median_s"] / row["product_median_s"]
        row["max_rel_diff"] = float(diff)
        print(f"{row['threads']:>8} {row['world_size']:>5} {row['threads_per_process']:>8} "
              f"{row['product_median_s']:>12.3f} {row['speedup']:>8.2f} "
              f"{row['product_cpu_median_s']:>10.3f} "
              f"{row['all_reduce_median_s']:>14.4f} {row['max_rel_diff']:>12.1e}")  # fmt: skip
    print(f"load average before the run: {load:.2f} (time on a shared machine is "
          "noisy; 'CPU s/rank' is the slowest rank's CPU time per product)")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--thread-settings", nargs="+", default=["1", "default"])
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    # worker mode (started by the launcher)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="1", help=argparse.SUPPRESS)
    parser.add_argument("--init-method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = launch(args)
    if args.json:
        for row in rows:
            row.pop("product")
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
