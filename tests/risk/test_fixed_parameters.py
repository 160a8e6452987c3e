"""NOTE [fixed parameters]: results carry no autograd graph into parameters outside params.

Last-layer Laplace passes the head's weight and bias as ``params`` while the body's
parameters still require grad. Every product, dense matrix, diagonal, gradient and estimate
must then be a plain tensor (no ``grad_fn``), equal to the dense float64 reference, and the
body's ``.grad`` / ``requires_grad`` untouched.
"""

import pytest
import torch
from torch import nn

from curvops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
    TransposedJacobianLinearOperator,
    hutchinson_trace,
    xdiag,
)
from curvops.testing import dense_ef, dense_ggn, dense_gradient_and_loss, dense_hessian

EXACT = {
    "ggn": GGNLinearOperator,
    "hessian": HessianLinearOperator,
    "ef": EFLinearOperator,
    "mc": FisherMCLinearOperator,
}
KRONECKER = {"kfac": KFACLinearOperator, "ekfac": EKFACLinearOperator, "kfoc": KFOCLinearOperator}


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = [(torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (4, 3)]
    params = [model[2].weight, model[2].bias]  # the body (model[0]) still requires grad
    return model, nn.CrossEntropyLoss(), params, data


def _assert_detached(name: str, t) -> None:
    tensors = list(t) if isinstance(t, (list, tuple)) else [t]
    for x in tensors:
        assert x.grad_fn is None and not x.requires_grad, f"{name} carries an autograd graph"


def _assert_all_results_detached(A, gradient: bool = True) -> None:
    D = A.shape[1]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(D, generator=gen, dtype=torch.float64)
    V = torch.randn(D, 3, generator=gen, dtype=torch.float64)
    U = torch.randn(3, A.shape[0], generator=gen, dtype=torch.float64)
    _assert_detached("A @ v", A @ v)
    _assert_detached("A @ V", A @ V)
    tensors = [torch.randn(*s, 2, generator=gen, dtype=torch.float64) for s in A.in_shapes]
    _assert_detached("A @ [tensors]", A @ tensors)
    _assert_detached("X @ A", U @ A)
    _assert_detached("A.to_dense()", A.to_dense())
    if gradient:
        grads, loss = A.gradient_and_loss()
        _assert_detached("gradient_and_loss()", [*grads, loss])


@pytest.mark.parametrize("kind", EXACT)
def test_exact_operators_detached_and_correct(kind):
    model, loss_func, params, data = _problem()
    A = EXACT[kind](model, loss_func, params, data)
    _assert_all_results_detached(A)
    if kind != "hessian":
        _assert_detached("diagonal()", A.diagonal())
    _assert_detached("hutchinson_trace", hutchinson_trace(A, 4))
    _assert_detached("xdiag", xdiag(A, 4))
    reference = {"ggn": dense_ggn, "hessian": dense_hessian, "ef": dense_ef, "mc": None}[kind]
    if reference is not None:
        dense = reference(model, loss_func, params, data)
        torch.testing.assert_close(A.to_dense(), dense, rtol=1e-10, atol=1e-12)
    grads, loss = A.gradient_and_loss()
    ref_grad, ref_loss = dense_gradient_and_loss(model, loss_func, params, data)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), ref_grad)
    torch.testing.assert_close(loss, ref_loss)
    # the caller's state: the body still requires grad and has no .grad
    assert model[0].weight.requires_grad and model[0].weight.grad is None


def test_client_backward_after_products():
    """The failure users saw: the product's graph was consumed by the client's first backward."""
    model, loss_func, params, data = _problem()
    G = GGNLinearOperator(model, loss_func, params, data)
    V = torch.eye(G.shape[1], dtype=torch.float64)[:, :4]
    result = G @ V
    for _ in range(2):  # a client differentiating its own objective twice
        model.zero_grad()
        (model(data[0][0]).sum() + result.sum()).backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("kind", KRONECKER)
def test_kronecker_operators_detached(kind):
    model, loss_func, params, data = _problem()
    A = KRONECKER[kind](model, loss_func, params, data)
    _assert_all_results_detached(A)
    _assert_detached("diagonal()", A.diagonal())


def test_jacobians_detached_and_correct():
    model, _, params, data = _problem()
    J = JacobianLinearOperator(model, params, data)
    _assert_all_results_detached(J, gradient=False)
    JT = TransposedJacobianLinearOperator(model, params, data)
    _assert_all_results_detached(JT, gradient=False)
    X = torch.cat([x for x, _ in data])
    flat = torch.cat([p.detach().flatten() for p in params])

    def head(theta):
        W, b = theta[:15].view(3, 5), theta[15:]
        return torch.func.functional_call(model, {"2.weight": W, "2.bias": b}, (X,))

    ref = torch.func.jacrev(head)(flat).detach().reshape(-1, flat.numel())
    torch.testing.assert_close(J.to_dense(), ref)


def test_callable_closing_over_trainable_tensors():
    """A callable model_func hides the body from curvops: results are detached anyway."""
    model, loss_func, _, data = _problem()
    head = [model[2].weight, model[2].bias]

    def model_func(params, X):
        return torch.nn.functional.linear(model[1](model[0](X)), params[0], params[1])

    for cls in (GGNLinearOperator, HessianLinearOperator, EFLinearOperator):
        A = cls(model_func, loss_func, head, data)
        _assert_all_results_detached(A)
