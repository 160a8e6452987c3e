"""Inputs that real users hit: attention modules under forward mode, MSE forward-over-reverse.

Every operator is compared with the dense float64 references of :mod:`curvops.testing`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)
from curvops.testing import dense_ef, dense_ggn, dense_hessian, dense_jacobian

TOL = {"rtol": 1e-9, "atol": 1e-11}


class _MultiheadAttentionNet(nn.Module):
    """``nn.MultiheadAttention`` with or without attention weights (two PyTorch code paths)."""

    def __init__(self, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.attention(x, x, x, need_weights=self.need_weights)
        return self.head(h).mean(1)


class _CausalSelfAttention(nn.Module):
    """A GPT-style block calling ``F.scaled_dot_product_attention`` directly."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 2).unbind(2)
        h = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.head(h.transpose(1, 2).flatten(2)).mean(1)


MODELS = {
    "mha": lambda: _MultiheadAttentionNet(need_weights=False),
    "mha-weights": lambda: _MultiheadAttentionNet(need_weights=True),
    "sdpa": _CausalSelfAttention,
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_attention_modules_under_forward_mode(name, training):
    """NOTE [nn.MultiheadAttention]: eval mode used to fail in every forward-mode product."""
    torch.manual_seed(0)
    model = MODELS[name]().double().train(training)
    X = torch.randn(5, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    params, loss_func = list(model.parameters()), nn.CrossEntropyLoss()
    ggn = dense_ggn(model, loss_func, params, data)
    hessian = dense_hessian(model, loss_func, params, data)
    cases = [
        (GGNLinearOperator(model, loss_func, params, data), ggn),
        (
            EFLinearOperator(model, loss_func, params, data),
            dense_ef(model, loss_func, params, data),
        ),
        (HessianLinearOperator(model, loss_func, params, data), hessian),
        (
            HessianLinearOperator(model, loss_func, params, data, mode="forward-over-reverse"),
            hessian,
        ),
    ]
    V = torch.randn(ggn.shape[0], 3, dtype=torch.float64)
    for A, dense in cases:
        torch.testing.assert_close(A @ V[:, 0], dense @ V[:, 0], **TOL)  # one column: duals
        torch.testing.assert_close(A @ V, dense @ V, **TOL)  # several columns: torch.func
    torch.testing.assert_close(cases[0][0].diagonal(), ggn.diagonal(), **TOL)
    mc = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=1)
    assert torch.isfinite(mc @ V).all()
    J = JacobianLinearOperator(model, params, data)
    torch.testing.assert_close(J @ V, dense_jacobian(model, params, data) @ V, **TOL)
    assert torch.backends.mha.get_fastpath_enabled()  # the process-wide flag is restored


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["forward-over-reverse", "auto"])
def test_mse_hessian_forward_over_reverse(mode, reduction):
    """NOTE [forward-mode mse_loss]: used to fail with "ZeroTensors are immutable"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [
        (torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64))
        for n in (3, 2)
    ]
    params, loss_func = list(model.parameters()), nn.MSELoss(reduction=reduction)
    H = HessianLinearOperator(model, loss_func, params, data, mode=mode)
    dense = dense_hessian(model, loss_func, params, data)
    v = torch.randn(H.shape[1], dtype=torch.float64)
    torch.testing.assert_close(H @ v, dense @ v, **TOL)
    torch.testing.assert_close(H.to_dense(), dense, **TOL)


def test_mse_in_the_model_function_forward_over_reverse():
    """A callable that calls ``F.mse_loss`` itself (e.g. a reconstruction term) works too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    params = list(model.parameters())

    def model_func(p, X):
        out = torch.func.functional_call(model, {"0.weight": p[0], "0.bias": p[1]}, (X,))
        return (out + F.mse_loss(out, X)).sum(1, keepdim=True)

    data = [(X, torch.zeros(4, 1, dtype=torch.float64))]
    H = HessianLinearOperator(model_func, nn.MSELoss(), params, data, mode="forward-over-reverse")
    dense = dense_hessian(model_func, nn.MSELoss(), params, data)
    torch.testing.assert_close(H.to_dense(), dense, **TOL)
