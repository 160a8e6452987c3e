"""Top eigenvalues and trace of a GGN whose data is sharded over processes.

Every process (rank) holds a different part of scikit-learn's digits; the GGN operator on
each rank nevertheless represents the GGN of the *whole* data set: each product sums the
ranks' partial products with one all-reduce (see docs/distributed.md).

Run on CPUs (gloo), two processes::

    torchrun --nproc_per_node=2 examples/distributed_ggn.py

On a machine with GPUs (NCCL, one GPU per process)::

    torchrun --nproc_per_node=<number of GPUs> examples/distributed_ggn.py --backend nccl

Without ``torchrun`` it runs as a single process (the same numbers, up to rounding).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

from curvops import GGNLinearOperator
from curvops.linalg import eigsh, hutchinson_trace
from curvops.risk.distributed import synchronized_generator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default=None,
        help="default: nccl if CUDA is available, else gloo",
    )
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the MLP")
    parser.add_argument("--num-data", type=int, default=None, help="use the first N digits")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    parser.add_argument("--num-matvecs", type=int, default=200, help="Hutchinson samples")
    parser.add_argument(
        "--exact-trace",
        action="store_true",
        help="also compute the exact trace (D products; small nets only)",
    )
    return parser.parse_args(argv)


def setup(backend: str | None) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes (if any); return the device and ownership."""
    if dist.is_initialized():  # e.g. called from a test that already set up the group
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device()), False
        return torch.device("cpu"), False
    if "RANK" not in os.environ:  # plain `python examples/distributed_ggn.py`
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        # one GPU per process: torchrun sets LOCAL_RANK, the process's index on its machine
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # before any collective (all_gather_object uses it)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)  # reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    return device, True


def digits_shard(rank: int, world_size: int, num_data: int | None, batch_size: int, device):
    """This rank's batches of the digits: data points rank, rank + W, rank + 2W, ..."""
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    X, y = X[:num_data], y[:num_data]
    X, y = X[rank::world_size].to(device), y[rank::world_size].to(device)
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


def build_model(hidden: int, device: torch.device) -> nn.Module:
    """The same MLP on every rank (seeded, then rank 0's weights broadcast to be sure)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    model = model.to(device=device, dtype=torch.float64).eval()
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    return model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, owns_group = setup(args.backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    try:
        data = digits_shard(rank, world_size, args.num_data, args.batch_size, device)
        model = build_model(args.hidden, device)
        params = [p for p in model.parameters() if p.requires_grad]

        start = time.perf_counter()
        G = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data)  # world group
        # random vectors must be identical on every rank: a synchronized generator
        evals, _ = eigsh(G, k=args.k, which="LA", generator=synchronized_generator(0))
        trace, error = hutchinson_trace(
            G, args.num_matvecs, generator=synchronized_generator(1), return_error=True
        )
        exact = G.to_dense().trace() if args.exact_trace else None
        seconds = time.perf_counter() - start

        results = {
            "world_size": world_size,
            "num_data": G.num_data,
            "local_num_data": sum(len(X) for X, _ in data),
            "dim": G.shape[1],
            "top_eigenvalues": evals.flip(0).tolist(),
            "trace_estimate": float(trace),
            "trace_std_error": float(error),
            "exact_trace": None if exact is None else float(exact),
            "seconds": seconds,
        }
        if rank == 0:
            print(
                f"{world_size} process(es); N = {G.num_data} digits "
                f"(this rank: {results['local_num_data']}); D = {G.shape[1]} parameters"
            )
            print(
                f"top-{args.k} GGN eigenvalues: "
                + ", ".join(f"{v:.5g}" for v in results["top_eigenvalues"])
            )
            print(f"trace (Hutchinson, {args.num_matvecs} samples): {trace:.5g} +- {error:.2g}")
            if exact is not None:
                print(f"trace (exact): {exact:.5g}")
            print(f"time: {seconds:.2f} s")
        return results
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
