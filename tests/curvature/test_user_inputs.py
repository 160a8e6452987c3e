"""Inputs that real users hit: attention modules under forward mode, MSE forward-over-reverse.

Every operator is compared with the dense float64 references of :mod:`curvops.testing`.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

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


def _parametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    if kind == "weight_norm":
        parametrizations.weight_norm(model[0])
    elif kind == "legacy_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model[0] = nn.utils.weight_norm(model[0])
    elif kind == "orthogonal":
        parametrizations.orthogonal(model[2])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(model[0])
        model.eval()  # no power iteration: a fixed function
    return model


@pytest.mark.parametrize(
    "kind", ["weight_norm", "legacy_weight_norm", "orthogonal", "spectral_norm"]
)
def test_parametrized_weights(kind):
    """NOTE [weight norm]: weight_norm used to fail in every forward-mode product."""
    model = _parametrized(kind)
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    params, loss_func = list(model.parameters()), nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in params), 3, dtype=torch.float64)
    ggn, hessian = (
        dense_ggn(model, loss_func, params, data),
        dense_hessian(model, loss_func, params, data),
    )
    for A, dense in [
        (GGNLinearOperator(model, loss_func, params, data), ggn),
        (
            EFLinearOperator(model, loss_func, params, data),
            dense_ef(model, loss_func, params, data),
        ),
        (
            HessianLinearOperator(model, loss_func, params, data, mode="forward-over-reverse"),
            hessian,
        ),
        # the default mode was silently 0.28 off with weight_norm (a wrong double backward)
        (HessianLinearOperator(model, loss_func, params, data), hessian),
    ]:
        torch.testing.assert_close(A @ V[:, 0], dense @ V[:, 0], **TOL)
        torch.testing.assert_close(A @ V, dense @ V, **TOL)
    J = JacobianLinearOperator(model, params, data)
    torch.testing.assert_close(J @ V, dense_jacobian(model, params, data) @ V, **TOL)


def test_spectral_norm_in_training_mode_is_explained():
    """Its power iteration writes with out=, which has no forward-mode derivative."""
    model = _parametrized("spectral_norm").train()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    with pytest.raises(
        NotImplementedError, match=r"spectral_norm in training mode.*model.eval\(\)"
    ):
        GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)


@pytest.mark.parametrize(
    "layer", [nn.SiLU, nn.Mish, lambda: nn.GroupNorm(2, 4)], ids=["silu", "mish", "groupnorm"]
)
@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse", "auto"])
def test_hessian_modes_through_fused_layers(mode, layer):
    """NOTE [unfused layers]: forward-over-reverse failed ("forward AD with silu_backward")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), layer(), nn.Linear(4, 2)).double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    params, loss_func = list(model.parameters()), nn.CrossEntropyLoss()
    H = HessianLinearOperator(model, loss_func, params, data, mode=mode)
    dense = dense_hessian(model, loss_func, params, data)
    V = torch.randn(H.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(H @ V[:, 0], dense @ V[:, 0], **TOL)
    torch.testing.assert_close(H @ V, dense @ V, **TOL)
