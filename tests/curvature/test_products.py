"""The pure per-batch products against dense float64 references (torch.func, explicit)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvops.curvature import products as P

DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-11}


def _problem(loss_name: str = "ce"):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    X = torch.randn(6, 3, dtype=DT)
    if loss_name == "ce":
        y, loss_func = torch.randint(0, 4, (6,)), nn.CrossEntropyLoss()
    else:
        y, loss_func = torch.randn(6, 4, dtype=DT), nn.MSELoss(reduction="sum")
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(*p):
        return functional_call(model, dict(zip(names, p)), (X,))

    def flat_f(theta):
        return f(*[t.reshape(s) for t, s in zip(theta.split(sizes), shapes)])

    theta = torch.cat([p.flatten() for p in params])
    return model, f, flat_f, theta, params, X, y, loss_func


def _columns(params, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(K, *p.shape, generator=gen, dtype=DT) for p in params]


def _flat(V):
    return torch.cat([v.flatten(start_dim=1) for v in V], dim=1)  # [K, D]


def _dense_ggn(flat_f, theta, loss_of_output):
    out = flat_f(theta).detach()
    J = jacrev(flat_f)(theta).reshape(out.numel(), -1)
    H = hessian(loss_of_output)(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_ggn_matmat(K, loss_name):
    plan = P.ProductPlan(max_columns_per_pass=2)  # K = 3 runs two vectorised chunks
    _, f, flat_f, theta, params, _, y, loss_func = _problem(loss_name)

    def loss_of_output(out):
        return loss_func(out, y)

    G = _dense_ggn(flat_f, theta, loss_of_output)
    V = _columns(params, K)
    result = P.ggn_matmat(f, loss_of_output, params, V, plan=plan)
    assert [r.shape for r in result] == [v.shape for v in V]
    torch.testing.assert_close(_flat(result), _flat(V) @ G.T, **TOL)
    assert plan.column_passes == (0 if K == 1 else 2)


@pytest.mark.parametrize("K", [1, 3])
def test_factor_ggn_matmat_is_ggn_of_factor_outer_products(K):
    _, f, flat_f, theta, params, _, _, _ = _problem()
    gen = torch.Generator().manual_seed(5)
    S = torch.randn(2, 6, 4, generator=gen, dtype=DT)  # two factors per datum
    out = flat_f(theta).detach()
    J = jacrev(flat_f)(theta).reshape(out.numel(), -1)
    M = torch.zeros(out.numel(), out.numel(), dtype=DT)
    for n in range(6):  # block-diagonal over data: sum_j s_j[n] s_j[n]^T
        block = sum(torch.outer(S[j, n], S[j, n]) for j in range(2))
        M[4 * n : 4 * n + 4, 4 * n : 4 * n + 4] = block
    V = _columns(params, K)
    result = P.factor_ggn_matmat(f, lambda output: S, params, V)
    torch.testing.assert_close(_flat(result), _flat(V) @ (J.T @ M @ J).T, **TOL)


@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse", "auto"])
@pytest.mark.parametrize("K", [1, 2])
def test_hessian_matmat(mode, K):
    _, f, flat_f, theta, params, _, y, loss_func = _problem()
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(*p):
        return loss_func(f(*p), y)

    H = hessian(lambda t: loss(*[a.reshape(s) for a, s in zip(t.split(sizes), shapes)]))(theta)
    V = _columns(params, K)
    plan = P.ProductPlan()
    result = P.hessian_matmat(loss, params, V, mode=mode, plan=plan)
    torch.testing.assert_close(_flat(result), _flat(V) @ H.T, **TOL)
    if mode == "auto":
        assert plan.hessian_mode in (
            P.HessianMode.REVERSE_OVER_REVERSE,
            P.HessianMode.FORWARD_OVER_REVERSE,
        )
        assert set(plan.probe_seconds) <= {"reverse-over-reverse", "forward-over-reverse"}
        chosen = plan.hessian_mode
        P.hessian_matmat(loss, params, V, mode="auto", plan=plan)
        assert plan.hessian_mode == chosen  # probed once


def test_hessian_probe_falls_back_when_forward_mode_fails():
    """mse_loss's forward-over-reverse fails in torch 2.13; the probe must pick reverse mode."""
    _, f, flat_f, theta, params, _, y, loss_func = _problem("mse")

    def loss(*p):
        return loss_func(f(*p), y)

    plan = P.ProductPlan()
    V = _columns(params, 1)
    try:
        P.hessian_matmat(loss, params, V, mode="forward-over-reverse")
        forward_mode_works = True
    except RuntimeError:
        forward_mode_works = False
    result = P.hessian_matmat(loss, params, V, mode="auto", plan=plan)
    expected = P.hessian_matmat(loss, params, V, mode="reverse-over-reverse")
    torch.testing.assert_close(result, expected, **TOL)
    if not forward_mode_works:
        assert plan.hessian_mode == P.HessianMode.REVERSE_OVER_REVERSE
        assert "forward-over-reverse" not in plan.probe_seconds


def test_hessian_matmat_errors():
    _, f, _, _, params, _, y, loss_func = _problem()
    V = _columns(params, 1)
    with pytest.raises(ValueError, match="Unknown Hessian mode 'sideways'"):
        P.hessian_matmat(lambda *p: loss_func(f(*p), y), params, V, mode="sideways")
    with pytest.raises(ValueError, match="needs a ProductPlan"):
        P.hessian_matmat(lambda *p: loss_func(f(*p), y), params, V, mode="auto")


@pytest.mark.parametrize("K", [1, 3])
def test_jacobian_products(K):
    _, f, flat_f, theta, params, _, _, _ = _problem()
    J = jacrev(flat_f)(theta).reshape(-1, theta.numel())
    V = _columns(params, K)
    JV = P.jacobian_matmat(f, params, V)
    assert JV.shape == (K, 6, 4)
    torch.testing.assert_close(JV.reshape(K, -1), _flat(V) @ J.T, **TOL)
    gen = torch.Generator().manual_seed(2)
    U = torch.randn(K, 6, 4, generator=gen, dtype=DT)
    JTU = P.jacobian_t_matmat(f, params, U)
    torch.testing.assert_close(_flat(JTU), U.reshape(K, -1) @ J, **TOL)


def test_unused_parameters_give_zeros():
    _, f, _, _, params, _, y, loss_func = _problem()
    unused = torch.randn(2, 2, dtype=DT)

    def f2(*p):
        return f(*p[:-1])

    V = _columns([*params, unused], 1)
    for result in (
        P.ggn_matmat(f2, lambda out: loss_func(out, y), [*params, unused], V),
        P.hessian_matmat(lambda *p: loss_func(f2(*p), y), [*params, unused], V),
        P.jacobian_t_matmat(f2, [*params, unused], torch.ones(1, 6, 4, dtype=DT)),
    ):
        assert torch.equal(result[-1], torch.zeros(1, 2, 2, dtype=DT))


def test_caller_state_untouched_and_grad_mode_independent():
    model, f, _, _, _, _, y, loss_func = _problem()
    params = list(model.parameters())  # the model's own leaves, requiring grad
    V = _columns(params, 1)
    expected = P.ggn_matmat(f, lambda out: loss_func(out, y), params, V)
    with torch.no_grad():  # products work under no_grad (they enable grad internally)
        got = P.ggn_matmat(f, lambda out: loss_func(out, y), params, V)
        hv = P.hessian_matmat(lambda *p: loss_func(f(*p), y), params, V)
    torch.testing.assert_close(got, expected, **TOL)
    assert all(h.isfinite().all() for h in hv)
    assert all(p.grad is None and p.requires_grad for p in params)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
def test_hessian_through_layer_norm_matches_finite_differences(mode):
    """LayerNorm: torch.func's double derivative is wrong in torch 2.13, autograd's is right.

    Central differences of the exact gradient have error O(eps^2) (truncation) plus
    O(1e-16 / eps) (rounding); eps = 1e-5 bounds both far below the tolerance.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(*p):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, p)), (X,)), y)

    def flat_grad(theta):
        p = [t.reshape(s).requires_grad_() for t, s in zip(theta.split(sizes), shapes)]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss(*p), p)])

    theta = torch.cat([p.flatten() for p in params])
    eps = 1e-5
    eye = torch.eye(theta.numel(), dtype=DT)
    fd = torch.stack(
        [(flat_grad(theta + eps * e) - flat_grad(theta - eps * e)) / (2 * eps) for e in eye]
    )
    V = _columns(params, 3)
    result = P.hessian_matmat(loss, params, V, mode=mode)
    torch.testing.assert_close(_flat(result), _flat(V) @ fd.T, rtol=1e-6, atol=1e-8)


def test_model_without_forward_mode_rule_gets_a_clear_error():
    class NoJvp(torch.autograd.Function):  # like the functions torch.compile generates
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    w = torch.randn(3, dtype=DT)
    V = [torch.ones(1, 3, dtype=DT)]
    with pytest.raises(NotImplementedError, match="torch.compile'd model"):
        P.ggn_matmat(lambda w: NoJvp.apply(w), lambda out: out.square().sum(), [w], V)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("which", ["ggn", "hessian"])
def test_products_accumulate_into_out(which, K):
    """``out=`` receives ``alpha`` times the product on top of its content, in place."""
    plan = P.ProductPlan(max_columns_per_pass=2)
    _, f, _, _, params, _, y, loss_func = _problem()
    V = _columns(params, K)
    start = _columns(params, K, seed=7)
    out = [s.clone() for s in start]
    if which == "ggn":
        expected = P.ggn_matmat(f, lambda o: loss_func(o, y), params, V)
        returned = P.ggn_matmat(
            f, lambda o: loss_func(o, y), params, V, out=out, alpha=0.25, plan=plan
        )
    else:
        loss = lambda *p: loss_func(f(*p), y)  # noqa: E731
        expected = P.hessian_matmat(loss, params, V)
        returned = P.hessian_matmat(loss, params, V, out=out, alpha=0.25, plan=plan)
    assert returned is out
    for o, s, e in zip(out, start, expected):
        torch.testing.assert_close(o, s + 0.25 * e, **TOL)


def test_tangent_with_shared_storage_is_copied_once():
    """A column viewing a larger buffer becomes a tangent via one plain copy (no zero fill)."""
    buffer = torch.randn(10, dtype=DT)
    view = buffer[2:8].view(2, 3)
    plain = P.plain_tangent(view)
    assert plain.untyped_storage().nbytes() == plain.numel() * plain.element_size()
    torch.testing.assert_close(plain, view)
    own = torch.randn(2, 3, dtype=DT)
    assert P.plain_tangent(own).data_ptr() == own.data_ptr()  # nothing to copy


@pytest.mark.parametrize("preset", [None, True, False])
def test_multi_column_backward_strategies_agree(preset):
    """NOTE [batched or looped backward]: both strategies are exact; the choice is recorded."""
    _, f, flat_f, theta, params, _, y, loss_func = _problem()

    def loss_of_output(out):
        return loss_func(out, y)

    G = _dense_ggn(flat_f, theta, loss_of_output)
    V = _columns(params, 5)
    # K = 5 with at most 2 columns per pass: three passes, the last one ragged (2, 2, 1 ->
    # evened out to 2, 2, 1)
    plan = P.ProductPlan(batched_backward=preset, max_columns_per_pass=2)
    result = P.ggn_matmat(f, loss_of_output, params, V, plan=plan)
    torch.testing.assert_close(_flat(result), _flat(V) @ G.T, **TOL)
    assert plan.batched_backward is (True if preset is None else preset)  # no convolution
    assert plan.column_passes == 3


def test_convolutions_get_a_looped_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    X, y = torch.randn(4, 2, 4, dtype=DT), torch.randint(0, 2, (4,))
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]

    def f(*p):
        return functional_call(model, dict(zip(names, p)), (X,))

    def loss_of_output(out):
        return nn.functional.cross_entropy(out, y)

    V = _columns(params, 3)
    plan = P.ProductPlan()
    looped = P.ggn_matmat(f, loss_of_output, params, V, plan=plan)
    assert plan.batched_backward is False
    batched = P.ggn_matmat(f, loss_of_output, params, V, plan=P.ProductPlan(batched_backward=True))
    for a, b in zip(looped, batched):
        torch.testing.assert_close(a, b, **TOL)
