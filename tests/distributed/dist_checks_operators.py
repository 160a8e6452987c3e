"""SPMD checks: distributed operators, estimators and the example equal single-process truths.

Registered in ``dist_registry.CHECKS`` on import; run by ``dist_worker.py`` on every rank.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse.linalg
import torch
import torch.distributed as dist
from cases import make_case
from dist_registry import (
    OPERATORS,
    TOL,
    Ctx,
    Skip,
    case_kwargs,
    check,
    linalg_function,
    union_dense,
)
from torch import nn

from curvops import (
    FisherMCLinearOperator,
    GGNLinearOperator,
    JacobianLinearOperator,
)
from curvops.risk.distributed import (
    per_rank_seed,
    synchronized_generator,
)
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ggn, dense_jacobian

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
    "seq-ce-padded-mean",
    "seq-mse-varlen-mean",
]
# with 3 ranks, rank 2's shard of seq-ce-padded-mean is one batch of padding only
PRODUCT_CASES_3 = ["mlp-ce-mean", "seq-ce-mean", "functional-ce-sum", "seq-ce-padded-mean"]


def _product_check(case_name: str, op_name: str) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        case = make_case(case_name)
        cls = OPERATORS[op_name][0]
        A = cls(
            case.model_func, case.loss_func, case.params, ctx.shard(case.data), **case_kwargs(case)
        )
        assert A.num_data == case.num_data, (A.num_data, case.num_data)
        dense = union_dense(op_name, case)
        assert_operator_matches(A, dense, **TOL)
        ctx.same_on_all_ranks(A.to_dense(), "to_dense")
        if op_name != "hessian":  # exact diagonals: summed across ranks like the products
            diagonal = A.diagonal()
            torch.testing.assert_close(diagonal, dense.diagonal(), **TOL)
            ctx.same_on_all_ranks(diagonal, "diagonal")

    return run


for _world, _cases in ((2, PRODUCT_CASES_2), (3, PRODUCT_CASES_3)):
    for _case in _cases:
        for _op in OPERATORS:
            if _op != "ef" or make_case(_case).supports_fisher:
                check(_world, name=f"{_op}[{_case}]")(_product_check(_case, _op))


def _gradient_and_loss_check(case_name: str) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        case = make_case(case_name)
        A = GGNLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
        B = GGNLinearOperator(
            case.model_func, case.loss_func, case.params, case.data, process_group=False
        )
        (g, loss), (g_ref, loss_ref) = A.gradient_and_loss(), B.gradient_and_loss()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, **TOL)

    return run


for _case in ("mlp-ce-mean", "seq-ce-padded-mean"):
    check(2, 3, name=f"gradient_and_loss[{_case}]")(_gradient_and_loss_check(_case))


@check(2, 3)
def kfac_padded_normalisers(ctx: Ctx) -> None:
    """Padding spread unevenly over the ranks (with 3 ranks, one rank holds only padding):
    distributed type-2 KFAC and EKFAC equal the single-process ones on all data."""
    from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator

    case = make_case("seq-ce-padded-mean")
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        args = (case.model_func, case.loss_func, case.params)
        A = cls(*args, ctx.shard(case.data), fisher_type="type-2")
        B = cls(*args, case.data, fisher_type="type-2", process_group=False)
        torch.testing.assert_close(A.to_dense(), B.to_dense(), **TOL)


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
    torch.testing.assert_close(A.diagonal(), expected.diagonal(), **TOL)  # the same draws
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
    eigsh = linalg_function("eigsh")
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


ESTIMATORS = ["hutchinson_trace", "hutchpp_trace", "xtrace", "hutchinson_diag", "xdiag"]


@check(2, 3)
def estimators_with_synchronized_generator(ctx: Ctx) -> None:
    """Every estimator gives the single-process result on the union, on every rank."""
    case = make_case("mlp-ce-mean")
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, ctx.shard(case.data))
    B = GGNLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, process_group=False
    )
    for name in ESTIMATORS:
        estimate = linalg_function(name)
        est = estimate(G, 12, generator=synchronized_generator(2))
        ref = estimate(B, 12, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(est, ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        ctx.same_on_all_ranks(est.reshape(-1), name)


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


@check(2)
def example_distributed_ggn(ctx: Ctx) -> None:
    """examples/distributed_ggn.py inside this process group, against dense truths."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "distributed_ggn.py"
    spec = importlib.util.spec_from_file_location("distributed_ggn_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--hidden", "8", "--num-data", "300", "--batch-size", "64", "--k", "3"]
    out = example.main([*argv, "--num-matvecs", "40"])
    assert (out["world_size"], out["num_data"], out["dim"]) == (ctx.world, 300, 610), out
    assert out["local_num_data"] == len(range(ctx.rank, 300, ctx.world))
    X, y = example.digits_shard(0, 1, 300, 300, torch.device("cpu"))[0]
    model = example.build_model(8, torch.device("cpu"))
    dense = dense_ggn(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    evals = torch.linalg.eigvalsh(dense).flip(0)[:3]
    top = torch.tensor(out["top_eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(top, evals, **TOL)
    exact = dense.trace().item()
    # Hutchinson: a fixed seed, so deterministic; 4 standard errors bound the estimate
    assert abs(out["trace_estimate"] - exact) < 4 * out["trace_std_error"], (out, exact)


@check(2, 3)
def kfoc_factors(ctx: Ctx) -> None:
    """KFOC on shards = KFOC on the union, cached, uncached, and with caching on rank 0 only."""
    from curvops.kronecker import KFOCLinearOperator

    case = make_case("seq-ce-mean")  # linear layers shared over T = 3 positions
    options = {"tolerance": 1e-10, "max_iterations": 300}
    union = KFOCLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, process_group=False, **options
    ).to_dense()
    for budget in (2**30, 0, 2**30 if ctx.rank == 0 else 0):
        K = KFOCLinearOperator(
            case.model_func,
            case.loss_func,
            case.params,
            ctx.shard(case.data),
            max_cache_bytes=budget,
            **options,
        )
        assert_operator_matches(K, union, **TOL)
        assert all(c.converged for c in K.convergence.values())
