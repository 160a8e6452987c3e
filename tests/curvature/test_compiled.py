"""Compiled per-batch products (``compile=True``) against dense float64 references."""

import pytest
import torch
from cases import FISHER_CASES, make_case
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.func import functional_call

from curvops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from curvops.curvature.compiled import (
    compiled_factor_ggn_matmat,
    compiled_ggn_matmat,
    compiled_hessian_matmat,
    gradient_factors,
)
from curvops.testing.dense import dense_ef, dense_ggn, dense_hessian

TOL = {"rtol": 1e-8, "atol": 1e-10}


def _mlp_problem(batch_sizes=(4, 4)):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    data = [
        (
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in batch_sizes
    ]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def _columns(D, K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------- no graph breaks
def _explained(kind):
    model, loss, params, data = _mlp_problem()
    X, y = data[0]
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in params)
    V = tuple(torch.randn(2, *p.shape, dtype=p.dtype) for p in params)

    def forward(p, X):
        return functional_call(model, dict(zip(names, p)), (X,))

    if kind == "ggn":
        fn = lambda p, X, y, V: compiled_ggn_matmat(  # noqa: E731
            lambda *q: forward(q, X), lambda o: loss(o, y), p, V
        )
        args = (params, X, y, V)
    elif kind == "hessian":
        fn = lambda p, X, y, V: compiled_hessian_matmat(  # noqa: E731
            lambda *q: loss(forward(q, X), y), p, V
        )
        args = (params, X, y, V)
    elif kind == "gradient":
        scale = torch.tensor(2.0, dtype=torch.float64)
        fn = lambda p, X, y, scale, V: compiled_factor_ggn_matmat(  # noqa: E731
            lambda *q: forward(q, X), gradient_factors(lambda o: loss(o, y), scale), p, V
        )
        args = (params, X, y, scale, V)
    else:
        S = torch.randn(2, 4, 3, dtype=torch.float64)
        fn = lambda p, X, S, V: compiled_factor_ggn_matmat(  # noqa: E731
            lambda *q: forward(q, X), lambda o: S * o, p, V
        )
        args = (params, X, S, V)
    return fn, args


@pytest.mark.parametrize("kind", ["ggn", "hessian", "factor", "gradient"])
def test_per_batch_products_trace_without_graph_breaks(kind):
    fn, args = _explained(kind)
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---------------------------------------------------------------- products
def _dense(cls, model, loss, params, data, **kwargs):
    if cls is GGNLinearOperator:
        return dense_ggn(model, loss, params, data)
    if cls is HessianLinearOperator:
        return dense_hessian(model, loss, params, data)
    return dense_ef(model, loss, params, data, **kwargs)


@pytest.mark.parametrize("cls", [GGNLinearOperator, HessianLinearOperator, EFLinearOperator])
def test_compiled_operator_matches_dense(cls):
    model, loss, params, data = _mlp_problem()
    counter = CompileCounter()
    A = cls(model, loss, params, data, compile=True, compile_options={"backend": counter})
    dense = _dense(cls, model, loss, params, data)
    V = _columns(A.shape[1], 9)
    torch.testing.assert_close(A @ V[:, 0], dense @ V[:, 0], **TOL)
    torch.testing.assert_close(A @ V[:, :3], dense @ V[:, :3], **TOL)  # one pass, 4 wide
    if cls is GGNLinearOperator:  # (the other operators share the column passes)
        torch.testing.assert_close(A @ V, dense @ V, **TOL)  # passes 8 and 1 wide
    # one batch shape, passes 1, 4 (and 8) wide: one graph each, whatever the number of
    # products (the determinism check at construction made two)
    assert counter.frame_count == (3 if cls is GGNLinearOperator else 2)
    assert all(p.grad is None and p.requires_grad for p in params)


def test_compiled_empirical_fisher_of_loss_terms_matches_dense():
    case = make_case("seq-ce-mean")  # positions: the loss-term grouping of the factors
    data = case.data[:1]  # one batch shape, one graph
    E = EFLinearOperator(
        case.model_func,
        case.loss_func,
        case.params,
        data,
        compile=True,
        compile_options={"backend": "eager"},
        check_deterministic=False,
    )
    dense = dense_ef(case.model_func, case.loss_func, case.params, data)
    V = _columns(E.shape[1], 2)
    torch.testing.assert_close(E @ V, dense @ V, **TOL)


# both conventions where data have positions (elsewhere they coincide)
_EF_CASES = [(name, "loss-term") for name in FISHER_CASES] + [
    (name, "datum") for name in FISHER_CASES if name.startswith("seq")
]


@pytest.mark.parametrize(("name", "gradient_of"), _EF_CASES)
def test_compiled_empirical_fisher_equals_eager(name, gradient_of):
    r"""In-graph factors (batch-loss gradients) = the eager factors, on every Fisher case.

    Covers mean and sum reductions, padding (``ignore_index``), label smoothing, positions,
    uneven and empty batches: the scale :math:`R_\mathbb{B}^{-1/2}` and the zero gradients
    at ignored targets must reproduce the eager operator's factors.
    """
    _assert_compiled_equals_eager(EFLinearOperator, name, gradient_of=gradient_of)


@pytest.mark.parametrize("name", FISHER_CASES)
def test_compiled_mc_fisher_equals_eager(name):
    """The same draws of the same private generator (NOTE [compiled products]).

    The random numbers are drawn before the forward pass and turned into would-be gradients
    inside the graph; padding, uneven batches and every likelihood must give the eager
    operator's matrix.
    """
    _assert_compiled_equals_eager(FisherMCLinearOperator, name, mc_samples=3, seed=5)


def _assert_compiled_equals_eager(cls, name, **kwargs):
    """``cls`` with ``compile=True`` equals the eager operator on case ``name``."""
    case = make_case(name)
    args = (case.model_func, case.loss_func, case.params, case.data)
    kwargs["batch_size_fn"] = case.batch_size_fn
    eager = cls(*args, **kwargs)
    compiled = cls(
        *args,
        **kwargs,
        compile=True,
        compile_options={"backend": "eager"},
        check_deterministic=False,
    )
    V = _columns(eager.shape[1], 2)
    torch.testing.assert_close(compiled @ V, eager @ V, **TOL)
    torch.testing.assert_close(compiled @ V[:, 0], eager @ V[:, 0], **TOL)


@pytest.mark.parametrize("cls", [EFLinearOperator, FisherMCLinearOperator])
def test_compiled_fisher_operators_trace_without_graph_breaks(cls):
    """The operators' own per-batch products (in-graph factors, shape checks) with padding."""
    case = make_case("seq-ce-padded-mean")
    A = cls(case.model_func, case.loss_func, case.params, case.data[:1], compile=True)
    batch_inputs = A._compiled_inputs(A.params, _first_batch(A))
    V = tuple(torch.randn(2, *p.shape, dtype=p.dtype) for p in A.params)
    explanation = torch._dynamo.explain(A._compiled_product())(tuple(A.params), *batch_inputs, V)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _first_batch(A):
    A._before_pass()
    return next(iter(A._risk.batches()))


def test_compiled_fisher_refuses_mismatched_targets():
    """A target shape the likelihood cannot read fails as in eager mode, not silently."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 1).double()
    data = [(torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, 1))]
    data = [(X, y.squeeze(1).double()) for X, y in data]  # [N] targets for [N, 1] outputs
    for cls in (EFLinearOperator, FisherMCLinearOperator):
        A = cls(
            model,
            nn.MSELoss(),
            list(model.parameters()),
            data,
            compile=True,
            compile_options={"backend": "eager"},
            check_deterministic=False,
        )
        with pytest.raises(ValueError, match="target shape"):
            A @ torch.ones(A.shape[1], dtype=torch.float64)


def test_compiled_product_is_reused_across_batches_and_products():
    model, loss, params, data = _mlp_problem(batch_sizes=(4, 4, 4, 2))
    counter = CompileCounter()
    G = GGNLinearOperator(
        model, loss, params, data, compile=True, compile_options={"backend": counter}
    )
    v = _columns(G.shape[1], 1)[:, 0]
    first = G @ v  # construction already compiled (determinism check): batch sizes 4 and 2
    assert counter.frame_count == 2
    with torch.no_grad():  # new parameter values: the same graphs
        params[0].mul_(0.5)
    second = G @ v
    assert counter.frame_count == 2
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, dense_ggn(model, loss, params, data) @ v, **TOL)


@pytest.mark.slow
def test_compiled_operator_with_inductor():
    model, loss, params, data = _mlp_problem(batch_sizes=(4,))
    G = GGNLinearOperator(model, loss, params, data, compile=True, check_deterministic=False)
    v = _columns(G.shape[1], 1)[:, 0]
    torch.testing.assert_close(G @ v, dense_ggn(model, loss, params, data) @ v, **TOL)


# ---------------------------------------------------------------- options
def test_compile_options_are_checked():
    model, loss, params, data = _mlp_problem()
    with pytest.raises(TypeError, match="compile must be True or False"):
        GGNLinearOperator(model, loss, params, data, compile="yes")
    with pytest.raises(TypeError, match="compile_options must be a dict"):
        GGNLinearOperator(model, loss, params, data, compile=True, compile_options="max")
    with pytest.raises(ValueError, match="has no effect without compile=True"):
        GGNLinearOperator(model, loss, params, data, compile_options={"mode": "default"})
    with pytest.raises(ValueError, match=r"torch.compile does not take: \['fast'\]"):
        GGNLinearOperator(model, loss, params, data, compile=True, compile_options={"fast": 1})


class _Attention(nn.Module):
    """One causal self-attention layer on ``F.scaled_dot_product_attention``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o).flatten(0, 1)


def test_compiled_products_through_attention():
    """SDPA's fused kernels have no forward-mode derivative: traced with the math backend."""
    gen = torch.Generator().manual_seed(0)
    model = _Attention().double()
    data = [(torch.randn(2, 5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    loss, params = nn.CrossEntropyLoss(), list(model.parameters())
    G = GGNLinearOperator(
        model, loss, params, data, compile=True, compile_options={"backend": "eager"}
    )
    v = _columns(G.shape[1], 1)[:, 0]
    torch.testing.assert_close(G @ v, dense_ggn(model, loss, params, data) @ v, **TOL)
