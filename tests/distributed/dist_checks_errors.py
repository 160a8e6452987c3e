"""SPMD checks: error paths raise a clear error on every rank, and the group stays in step.

Registered in ``dist_registry.CHECKS`` on import (after the operator checks); run by
``dist_worker.py`` on every rank.
"""

from __future__ import annotations

import torch
from cases import make_case
from dist_registry import (
    TOL,
    Ctx,
    check,
    linalg_function,
    union_dense,
)
from torch import nn

from curvops import (
    EFLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    NonDeterministicError,
)
from curvops.risk.distributed import (
    DistributedRankError,
    synchronized_generator,
)
from curvops.testing import assert_operator_matches


# ==================================================================== error paths
class Drifting:
    """A re-iterable whose inputs change on every pass (non-deterministic data)."""

    def __init__(self, data: list):
        self.data, self.passes = data, 0

    def __iter__(self):
        self.passes += 1
        return iter([(X + 0.1 * self.passes, y) for X, y in self.data])


class Breakable:
    """A re-iterable that raises once ``broken`` is set (e.g. a failing file system)."""

    def __init__(self, data: list):
        self.data, self.broken = data, False

    def __iter__(self):
        if self.broken:
            raise RuntimeError("simulated I/O failure while reading the shard")
        return iter(self.data)


def _mlp_problem(ctx: Ctx):
    case = make_case("mlp-ce-mean")
    return case, ctx.shard(case.data)


@check(2, 3, phase=1)
def error_estimator_with_unsynchronized_global_rng(ctx: Ctx) -> None:
    """generator=None draws from each rank's global RNG: the ranks notice and all raise."""
    trace = linalg_function("hutchinson_trace")
    case, shard = _mlp_problem(ctx)
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, shard)
    torch.manual_seed(100 + ctx.rank)  # this worker process's own global RNG
    ctx.expect(ValueError, "the ranks multiplied different vectors", lambda: trace(G, 4))


@check(2, 3, phase=1)
def error_empty_shard(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    last = ctx.world - 1
    data = [] if ctx.rank == last else shard
    ctx.expect(
        ValueError,
        rf"shards of rank\(s\) \[{last}\] are empty",
        lambda: GGNLinearOperator(case.model_func, case.loss_func, case.params, data),
    )


@check(2, 3, phase=1)
def error_parameter_shapes_differ(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    model = nn.Sequential(
        nn.Linear(3, 6 + (ctx.rank == 1)), nn.Tanh(), nn.Linear(6 + (ctx.rank == 1), 3)
    ).double()
    ctx.expect(
        ValueError,
        r"parameter shapes differ between ranks \(rank 0: \[\(6, 3\).*rank 1: \[\(7, 3\)",
        lambda: GGNLinearOperator(model, case.loss_func, list(model.parameters()), shard),
    )


@check(2, 3, phase=1)
def error_loss_differs(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    loss = nn.CrossEntropyLoss(reduction="sum" if ctx.rank == 0 else "mean")
    ctx.expect(
        ValueError,
        "loss reductions differ between ranks",
        lambda: GGNLinearOperator(case.model_func, loss, case.params, shard),
    )


@check(2, 3, phase=1)
def error_nondeterministic_on_one_rank(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    last = ctx.world - 1
    data = Drifting(shard) if ctx.rank == last else shard
    for cls in (GGNLinearOperator, HessianLinearOperator):
        ctx.expect(
            NonDeterministicError,
            rf"failed on rank\(s\) \[{last}\] of {ctx.world}; rank {last} reports: .*two eval",
            lambda cls=cls: cls(case.model_func, case.loss_func, case.params, data),
        )


@check(2, 3, phase=1)
def error_setup_fails_on_one_rank(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    data = [(shard[0][0],)] if ctx.rank == 1 else shard  # not an (X, y) pair
    if ctx.rank == 1:
        exc, pattern = ValueError, "Each batch must be a pair"
    else:
        exc, pattern = (
            DistributedRankError,
            r"Setting up the empirical risk failed on rank\(s\) \[1\].*must be a pair",
        )
    ctx.expect(
        exc, pattern, lambda: GGNLinearOperator(case.model_func, case.loss_func, case.params, data)
    )


@check(2, 3, phase=1)
def error_data_loop_fails_on_one_rank(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    data = Breakable(shard)
    G = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, data, check_deterministic=False
    )
    v = torch.randn(G.shape[1], generator=synchronized_generator(0), dtype=torch.float64)
    G @ v
    data.broken = ctx.rank == 1
    if ctx.rank == 1:
        exc, pattern = RuntimeError, "simulated I/O failure"
    else:
        exc, pattern = (
            DistributedRankError,
            r"GGNLinearOperator product failed on rank\(s\) \[1\].*simulated I/O failure",
        )
    ctx.expect(exc, pattern, lambda: G @ v)
    # the group is still in step: the next product works on every rank
    G_ok = GGNLinearOperator(case.model_func, case.loss_func, case.params, shard)
    torch.testing.assert_close(G_ok @ v, union_dense("ggn", case) @ v, **TOL)


@check(2, 3, phase=1)
def error_gradient_fails_on_one_rank(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    data = Breakable(shard)
    G = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, data, check_deterministic=False
    )
    data.broken = ctx.rank == 1
    exc, pattern = (
        (RuntimeError, "simulated I/O failure")
        if ctx.rank == 1
        else (DistributedRankError, r"The loss and gradient failed on rank\(s\) \[1\]")
    )
    ctx.expect(exc, pattern, G.gradient_and_loss)


@check(2, 3, phase=1)
def error_ranks_multiply_different_vectors(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, shard)
    D = G.shape[1]
    unsynced = torch.randn(
        D, generator=torch.Generator().manual_seed(ctx.rank), dtype=torch.float64
    )
    ctx.expect(ValueError, "the ranks multiplied different vectors", lambda: G @ unsynced)
    columns = torch.ones(D, 2 + ctx.rank, dtype=torch.float64)
    ctx.expect(ValueError, r"rank 0: 2 column\(s\).*rank 1: 3 column\(s\)", lambda: G @ columns)


@check(2, 3, phase=1)
def error_nan_input_on_one_rank(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, shard)
    v = torch.ones(G.shape[1], dtype=torch.float64)
    if ctx.rank == 1:
        v[0] = float("nan")
        exc, pattern = ValueError, "contains NaN or Inf"
    else:
        exc, pattern = DistributedRankError, r"failed on rank\(s\) \[1\].*NaN or Inf"
    ctx.expect(exc, pattern, lambda: G @ v)


@check(2, 3, phase=2)
def still_in_step_after_errors(ctx: Ctx) -> None:
    case = make_case("seq-ce-mean")
    E = EFLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    assert_operator_matches(E, union_dense("ef", case), **TOL)
