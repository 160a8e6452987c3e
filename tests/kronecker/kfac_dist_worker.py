"""One rank of the 2-process checks of ``test_collection_distributed.py`` (gloo, CPU).

Each check runs on every rank; the outcome (``"ok"`` or the raised error's type and message)
is written to a JSON file per rank, so the test can assert what *each* rank saw.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator
from curvops.risk.distributed import per_rank_seed

DTYPE = torch.float64
SEED = 11


class Breakable:
    """A re-iterable shard that raises on the ``k``-th pass after ``break_in(k)``."""

    def __init__(self, data: list):
        self.data, self.passes, self.breaking_pass = data, 0, None

    def break_in(self, k: int) -> None:
        self.breaking_pass = self.passes + k

    def __iter__(self):
        self.passes += 1
        if self.passes == self.breaking_pass:
            raise RuntimeError("simulated I/O failure in the statistics pass")
        return iter(self.data)


def problem(rank: int, world: int):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(n, 3, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g))
        for n in (4, 3, 5, 2, 6)
    ]
    return model, data[rank::world]


def make(cls, model, data, **kwargs):
    options = {"fisher_type": "mc", "seed": SEED, "check_deterministic": False} | kwargs
    return cls(model, nn.CrossEntropyLoss(), list(model.parameters()), data, **options)


def mc_rank_seeds(rank: int, world: int) -> None:
    """Distributed MC factors = shard factors with per-rank seeds, weighted by shard sizes."""
    model, shard = problem(rank, world)
    K = make(KFACLinearOperator, model, shard)
    sizes = [sum(x.shape[0] for x, _ in problem(r, world)[1]) for r in range(world)]
    for name in ("0", "2"):
        A = torch.zeros_like(K.factors[name].input_factor)
        B = torch.zeros_like(K.factors[name].gradient_factor)
        for r in range(world):
            local = make(
                KFACLinearOperator,
                model,
                problem(r, world)[1],
                seed=per_rank_seed(SEED, r),
                process_group=False,
            )
            A += sizes[r] / sum(sizes) * local.factors[name].input_factor
            B += sizes[r] / sum(sizes) * local.factors[name].gradient_factor
        torch.testing.assert_close(K.factors[name].input_factor, A)
        torch.testing.assert_close(K.factors[name].gradient_factor, B)


def kfac_failure(rank: int, world: int) -> None:
    """Rank 1's data fails in the factor pass."""
    model, shard = problem(rank, world)
    data = Breakable(shard)
    K = make(KFACLinearOperator, model, data)
    if rank == 1:
        data.break_in(1)
    K.compute_factors()


def ekfac_failure(rank: int, world: int) -> None:
    """Rank 1's data fails in EKFAC's correction pass (the pass after the factor pass)."""
    model, shard = problem(rank, world)
    data = Breakable(shard)
    EK = make(EKFACLinearOperator, model, data)
    if rank == 1:
        data.break_in(2)
    EK.compute_factors()


def still_in_step(rank: int, world: int) -> None:
    """After the failures, a collective still pairs up (no rank was left inside one)."""
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2


CHECKS = [mc_rank_seeds, kfac_failure, ekfac_failure, still_in_step]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=args.init_method,
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=30),  # a hang fails instead
    )
    results = {}
    try:
        for check in CHECKS:
            try:
                check(args.rank, args.world_size)
                results[check.__name__] = "ok"
            except Exception as e:  # recorded for the test to judge
                results[check.__name__] = f"{type(e).__name__}: {e}"
            Path(args.out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
