"""Contexts and layers curvops refuses with a clear message (or handles), never cryptically."""

import pytest
import torch
from torch import nn

from curvops import (
    EFLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def _all(model, loss_func, params, data):
    return {
        "ggn": lambda: GGNLinearOperator(model, loss_func, params, data),
        "hessian": lambda: HessianLinearOperator(model, loss_func, params, data),
        "ef": lambda: EFLinearOperator(model, loss_func, params, data),
        "kfac": lambda: KFACLinearOperator(model, loss_func, params, data),
        "jacobian": lambda: JacobianLinearOperator(model, params, data),
    }


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac", "jacobian"])
def test_inference_mode_is_refused_clearly(kind):
    """NOTE [inference mode]: was "element 0 of tensors does not require grad" deep inside."""
    problem = _problem()
    build = _all(*problem)[kind]
    A = build()
    v = torch.randn(A.shape[1], dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.inference_mode\(\)"):
        build()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad\\(\\) is fine"):
        A @ v
    if kind not in ("jacobian",):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            A.gradient_and_loss()


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac", "jacobian"])
def test_no_grad_works(kind):
    """Under torch.no_grad() every operator builds and multiplies, with the same result."""
    problem = _problem()
    A = _all(*problem)[kind]()
    v = torch.randn(A.shape[1], dtype=torch.float64)
    expected = A @ v
    with torch.no_grad():
        torch.testing.assert_close(_all(*problem)[kind]() @ v, expected)
        torch.testing.assert_close(A @ v, expected)


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac"])
def test_embedding_max_norm_is_refused_without_mutating_the_weight(kind):
    """NOTE [in-place parameter updates]: a GGN used to change the weight by up to 1.98."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 2))
    model = model.double()
    before = model[0].weight.detach().clone()
    data = [(torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,)))]
    with pytest.raises(NotImplementedError, match=r"Embedding '0' uses max_norm=0.5.*emb.max_norm"):
        _all(model, nn.CrossEntropyLoss(), list(model.parameters()), data)[kind]()
    assert torch.equal(model[0].weight, before)
