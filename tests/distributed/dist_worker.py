"""SPMD worker of the distributed tests: one process per rank (launched by dist_launcher.py).

Every rank runs the same named checks in the same order on its shard ``data[rank::world]``
of a registry case and records, per check, ``passed``, ``failed`` (with the traceback) or
``skipped`` (with the reason) into a JSON file. Ground truths are dense float64 matrices of
the *whole* data set (the union of the shards) from ``curvops.testing.dense`` (torch.func).

Error-path checks assert that *this* rank raised the expected error; the checks after them
prove that the process group is still in step (no rank was left inside a collective).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse.linalg
import torch
import torch.distributed as dist
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the case registry
from cases import make_case  # noqa: E402

from curvops import (  # noqa: E402
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    NonDeterministicError,
)
from curvops.risk.distributed import (  # noqa: E402
    DistributedRankError,
    per_rank_seed,
    synchronized_generator,
)
from curvops.testing import assert_operator_matches  # noqa: E402
from curvops.testing.dense import dense_ef, dense_ggn, dense_hessian, dense_jacobian  # noqa: E402

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
        import re

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
CHECKS: dict[str, tuple[Callable[[Ctx], None], tuple[int, ...]]] = {}


def check(*world_sizes: int, name: str | None = None):
    def register(fn):
        CHECKS[name or fn.__name__] = (fn, world_sizes)
        return fn

    return register


def checks_for(world_size: int) -> list[str]:
    """Names of the checks a session of ``world_size`` ranks runs, in order."""
    return [name for name, (_, sizes) in CHECKS.items() if world_size in sizes]


# ==================================================================== products
PRODUCT_CASES_2 = [
    "mlp-ce-mean",
    "mlp-mse-sum",
    "mlp-bce-mean",
    "cnn-ce-mean",
    "seq-ce-mean",
    "dict-input-mse-mean",
    "functional-ce-sum",
    "subset-shuffled-ce-mean",
    "custom-quartic-mean",
]
PRODUCT_CASES_3 = ["mlp-ce-mean", "seq-ce-mean", "functional-ce-sum"]


def _product_check(case_name: str, op_name: str) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        case = make_case(case_name)
        cls = OPERATORS[op_name][0]
        A = cls(
            case.model_func, case.loss_func, case.params, ctx.shard(case.data), **case_kwargs(case)
        )
        assert A.num_data == case.num_data, (A.num_data, case.num_data)
        assert_operator_matches(A, union_dense(op_name, case), **TOL)
        ctx.same_on_all_ranks(A.to_dense(), "to_dense")

    return run


for _world, _cases in ((2, PRODUCT_CASES_2), (3, PRODUCT_CASES_3)):
    for _case in _cases:
        for _op in OPERATORS:
            if _op == "ef" and not make_case(_case).supports_fisher:
                continue
            _name = f"{_op}[{_case}]"
            CHECKS[_name] = (
                _product_check(_case, _op),
                (*CHECKS.get(_name, (None, ()))[1], _world),
            )


@check(2, 3)
def gradient_and_loss(ctx: Ctx) -> None:
    case = make_case("mlp-ce-mean")
    A = GGNLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    B = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, process_group=False
    )
    (g, loss), (g_ref, loss_ref) = A.gradient_and_loss(), B.gradient_and_loss()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL)


@check(2, 3)
def mc_fisher_uneven_shards(ctx: Ctx) -> None:
    """Distributed MC Fisher = sum over ranks of each shard's MC Fisher with the rank's seed."""
    case = make_case("mlp-ce-mean")
    seed, kw = 42, {"mc_samples": 3}
    A = FisherMCLinearOperator(
        case.model_func, case.loss_func, case.params, ctx.shard(case.data), seed=seed, **kw
    )
    expected = 0.0
    for r in range(ctx.world):
        shard = case.data[r :: ctx.world]
        n_r = sum(X.shape[0] for X, _ in shard)
        F_r = FisherMCLinearOperator(
            case.model_func,
            case.loss_func,
            case.params,
            shard,
            seed=per_rank_seed(seed, r),
            process_group=False,
            **kw,
        )
        expected = expected + (n_r / case.num_data) * F_r.to_dense()  # mean: N_r / N
    assert_operator_matches(A, expected, **TOL)
    ctx.same_on_all_ranks(A.to_dense(), "MC Fisher")
    again = FisherMCLinearOperator(
        case.model_func, case.loss_func, case.params, ctx.shard(case.data), seed=seed, **kw
    )
    torch.testing.assert_close(again.to_dense(), A.to_dense(), rtol=0, atol=0)  # reproducible


@check(2)
def mc_fisher_ranks_draw_differently(ctx: Ctx) -> None:
    """Both ranks hold the same data: their would-be labels must still differ."""
    case = make_case("mlp-ce-sum")
    seed = 7
    A = FisherMCLinearOperator(case.model_func, case.loss_func, case.params, case.data, seed=seed)
    F = [
        FisherMCLinearOperator(
            case.model_func,
            case.loss_func,
            case.params,
            case.data,
            seed=per_rank_seed(seed, r),
            process_group=False,
        ).to_dense()
        for r in range(ctx.world)
    ]
    assert (F[0] - F[1]).abs().max() > 1e-3 * F[0].abs().max(), "ranks drew the same labels"
    assert_operator_matches(A, F[0] + F[1], **TOL)  # reduction="sum": weights 1


@check(2, 3)
def jacobian_is_local(ctx: Ctx) -> None:
    case = make_case("mlp-mse-mean")
    shard = ctx.shard(case.data)
    J = JacobianLinearOperator(case.model_func, case.params, shard)
    dense = dense_jacobian(case.model_func, case.params, shard)
    assert J.shape[0] == dense.shape[0] == sum(X.shape[0] for X, _ in shard) * 3
    assert_operator_matches(J, dense, **TOL)


@check(2)
def opt_out_and_explicit_world(ctx: Ctx) -> None:
    case = make_case("mlp-ce-mean")
    shard = ctx.shard(case.data)
    local = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, shard, process_group=False
    )
    assert_operator_matches(
        local, dense_ggn(case.model_func, case.loss_func, case.params, shard), **TOL
    )
    world = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, shard, process_group=True
    )
    assert_operator_matches(world, union_dense("ggn", case), **TOL)


@check(3)
def subgroup(ctx: Ctx) -> None:
    """Ranks 0 and 1 sum over a subgroup; rank 2 is outside it."""
    sub = dist.new_group(ranks=[0, 1])  # collective over the world: every rank calls it
    case = make_case("mlp-ce-mean")
    if ctx.rank < 2:
        G = GGNLinearOperator(
            case.model_func, case.loss_func, case.params, ctx.shard(case.data), process_group=sub
        )
        both = case.data[0::3] + case.data[1::3]
        assert_operator_matches(
            G, dense_ggn(case.model_func, case.loss_func, case.params, both), **TOL
        )
    else:
        ctx.expect(
            ValueError,
            "not a member of the given process_group",
            lambda: GGNLinearOperator(
                case.model_func, case.loss_func, case.params, case.data, process_group=sub
            ),
        )


# ==================================================================== randomness
@check(2, 3)
def synchronized_generators(ctx: Ctx) -> None:
    fresh = torch.randn(5, generator=synchronized_generator(), dtype=torch.float64)
    ctx.same_on_all_ranks(fresh, "seed=None")
    seeded = torch.randn(5, generator=synchronized_generator(3), dtype=torch.float64)
    ctx.same_on_all_ranks(seeded, "seed=3")
    torch.testing.assert_close(
        seeded, torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    )
    ctx.expect(
        ValueError,
        r"different seeds on different ranks \(rank 0: 0, rank 1: 1",
        lambda: synchronized_generator(ctx.rank),
    )


def _linalg(name: str):
    try:
        module = importlib.import_module(f"curvops.linalg.{name}")
    except ImportError:
        module = None
    fn = getattr(importlib.import_module("curvops.linalg"), name, None)
    if not callable(fn):
        fn = getattr(module, name, None)
    if not callable(fn):
        raise Skip(f"curvops.linalg has no {name} yet (the linalg helper's code has not landed)")
    return fn


@check(2, 3)
def scipy_eigsh_with_synchronized_start(ctx: Ctx) -> None:
    case = make_case("cnn-ce-mean")
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    v0 = torch.randn(G.shape[1], generator=synchronized_generator(11), dtype=torch.float64).numpy()
    evals = scipy.sparse.linalg.eigsh(G.to_scipy(), k=3, which="LA", v0=v0, tol=1e-12)[0]
    expected = np.linalg.eigvalsh(union_dense("ggn", case).numpy())[-3:]
    np.testing.assert_allclose(np.sort(evals), expected, rtol=1e-8, atol=1e-10)


@check(2, 3)
def linalg_eigsh_with_synchronized_generator(ctx: Ctx) -> None:
    eigsh = _linalg("eigsh")
    case = make_case("cnn-ce-mean")
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    B = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, process_group=False
    )
    evals, evecs = eigsh(G, k=3, generator=synchronized_generator(5))
    ref, _ = eigsh(B, k=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(evals, ref, **TOL)
    ctx.same_on_all_ranks(evecs, "eigenvectors")
    dense = torch.linalg.eigvalsh(union_dense("ggn", case))[-3:]
    torch.testing.assert_close(evals, dense, rtol=1e-8, atol=1e-10)


@check(2, 3)
def hutchinson_with_synchronized_generator(ctx: Ctx) -> None:
    trace = _linalg("hutchinson_trace")
    case = make_case("mlp-ce-mean")
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    B = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, process_group=False
    )
    est = trace(G, num_matvecs=8, generator=synchronized_generator(2))
    ref = trace(B, num_matvecs=8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.as_tensor(est), torch.as_tensor(ref), **TOL)


@check(2, 3)
def kfac_factors(ctx: Ctx) -> None:
    try:
        kronecker = importlib.import_module("curvops.kronecker")
    except ImportError as e:
        raise Skip(f"curvops.kronecker is not importable yet ({e})") from e
    classes = [getattr(kronecker, n, None) for n in ("KFACLinearOperator", "EKFACLinearOperator")]
    if classes[0] is None:
        raise Skip("curvops.kronecker has no KFACLinearOperator yet (the KFAC code has not landed)")
    case = make_case("mlp-ce-mean")
    for cls in [c for c in classes if c is not None]:
        for fisher_type in ("type-2", "mc", "empirical"):
            kw = {"fisher_type": fisher_type}
            A = cls(case.model_func, case.loss_func, case.params, ctx.shard(case.data), **kw)
            if fisher_type == "mc":  # MC draws differ per rank by design: compare across ranks only
                ctx.same_on_all_ranks(A.to_dense(), f"{cls.__name__} mc")
                continue
            B = cls(
                case.model_func, case.loss_func, case.params, case.data, process_group=False, **kw
            )
            assert_operator_matches(A, B.to_dense(), **TOL)


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


@check(2, 3)
def error_empty_shard(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    last = ctx.world - 1
    data = [] if ctx.rank == last else shard
    ctx.expect(
        ValueError,
        rf"shards of rank\(s\) \[{last}\] are empty",
        lambda: GGNLinearOperator(case.model_func, case.loss_func, case.params, data),
    )


@check(2, 3)
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


@check(2, 3)
def error_loss_differs(ctx: Ctx) -> None:
    case, shard = _mlp_problem(ctx)
    loss = nn.CrossEntropyLoss(reduction="sum" if ctx.rank == 0 else "mean")
    ctx.expect(
        ValueError,
        "loss reductions differ between ranks",
        lambda: GGNLinearOperator(case.model_func, loss, case.params, shard),
    )


@check(2, 3)
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


@check(2, 3)
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


@check(2, 3)
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


@check(2, 3)
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


@check(2, 3)
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


@check(2, 3)
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


@check(2, 3)
def still_in_step_after_errors(ctx: Ctx) -> None:
    case = make_case("seq-ce-mean")
    E = EFLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    assert_operator_matches(E, union_dense("ef", case), **TOL)


# ==================================================================== main
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
            except Exception:  # noqa: BLE001 - recorded and reported by the test
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
