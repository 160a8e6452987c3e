"""Registry and helpers of the SPMD checks run by ``dist_worker.py`` (one process per rank).

A check is a function of a :class:`Ctx` registered with ``@check(world sizes...)``; every rank
runs the same checks in registration order. Ground truths are dense float64 matrices of the
*whole* data set (the union of the shards) from ``curvops.testing.dense`` (torch.func).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

import curvops.linalg
from curvops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator
from curvops.testing.dense import dense_ef, dense_ggn, dense_hessian

TOL = {"rtol": 1e-8, "atol": 1e-10}
OPERATORS = {
    "hessian": (HessianLinearOperator, dense_hessian),
    "ggn": (GGNLinearOperator, dense_ggn),
    "ef": (EFLinearOperator, dense_ef),
}


class Skip(Exception):
    """Raised by a check that cannot run yet (reason in the message)."""


# ==================================================================== context
class Ctx:
    """What a check knows: its rank, the world size, helpers to shard and compare."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world = rank, world_size

    def shard(self, data: list) -> list:
        return data[self.rank :: self.world]

    def same_on_all_ranks(self, t: Tensor, what: str) -> None:
        """Every rank holds the same tensor (the products are summed, so up to rounding)."""
        gathered = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(gathered, t.contiguous())
        for r, g in enumerate(gathered):
            torch.testing.assert_close(
                g, gathered[0], rtol=1e-12, atol=0.0, msg=f"{what}: rank {r}"
            )

    def expect(self, exc: type[BaseException], pattern: str, fn: Callable[[], object]) -> str:
        """Assert that ``fn()`` raises ``exc`` whose message matches ``pattern``."""
        try:
            fn()
        except exc as e:
            if not re.search(pattern, str(e), flags=re.S):
                raise AssertionError(
                    f"rank {self.rank}: {exc.__name__} {str(e)!r} does not match {pattern!r}"
                ) from e
            return str(e)
        raise AssertionError(f"rank {self.rank}: expected {exc.__name__} matching {pattern!r}")


def case_kwargs(case) -> dict:
    return {"batch_size_fn": case.batch_size_fn}


def union_dense(op_name: str, case) -> Tensor:
    return OPERATORS[op_name][1](
        case.model_func, case.loss_func, case.params, case.data, **case_kwargs(case)
    )


# ==================================================================== registry
CHECKS: dict[str, tuple[Callable[[Ctx], None], tuple[int, ...], int]] = {}
"""name -> (check, world sizes it runs for, phase)."""


def check(*world_sizes: int, phase: int = 0, name: str | None = None):
    """Register a check for sessions of the given world sizes.

    Phases order the checks across modules: 0 results, 1 error paths, 2 checks that the group
    is still in step afterwards; within a phase, registration order.
    """

    def register(fn):
        key = name or fn.__name__
        if key in CHECKS:
            _, sizes, old_phase = CHECKS[key]
            assert old_phase == phase, f"check {key} registered in two phases"
            world_sizes_all = tuple(sorted({*sizes, *world_sizes}))
        else:
            world_sizes_all = world_sizes
        CHECKS[key] = (fn, world_sizes_all, phase)
        return fn

    return register


def checks_for(world_size: int) -> list[str]:
    """Names of the checks a session of ``world_size`` ranks runs, in order."""
    names = [name for name, (_, sizes, _) in CHECKS.items() if world_size in sizes]
    return sorted(names, key=lambda name: CHECKS[name][2])  # stable: registration order


def linalg_function(name: str) -> Callable:
    """``curvops.linalg.<name>``, or skip the check if it does not exist (yet)."""
    fn = getattr(curvops.linalg, name, None)
    if not callable(fn):
        raise Skip(f"curvops.linalg has no {name}")
    return fn
