"""Which parameters get Kronecker blocks, which fall back, and which models are refused."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, build
from torch import nn

from curvops.kronecker import FallbackType, KFACLinearOperator


def data(in_dim: int = 3, out_dim: int = 2):
    return [(torch.randn(4, in_dim, dtype=DTYPE), torch.randn(4, out_dim, dtype=DTYPE))]


def kfac(model, params=None, **kwargs):
    params = list(model.parameters()) if params is None else params
    return KFACLinearOperator(
        model, nn.MSELoss(), params, data(), check_deterministic=False, **kwargs
    )


def test_unsupported_layer_without_fallback_names_module_and_option():
    model = build(lambda: nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
    with pytest.raises(
        ValueError, match=r"'1.weight' belongs to LayerNorm '1'.*fallback='diagonal'"
    ):
        kfac(model)


def test_raw_parameter_without_fallback_is_refused():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.gain = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.gain

    model = build(Gain)
    with pytest.raises(ValueError, match=r"'gain' belongs to Gain '<root>'"):
        kfac(model)
    K = kfac(model, fallback="diagonal")
    assert [K.param_names[i] for i in K._fallback_indices] == ["gain"]


def test_weight_tied_between_two_modules_is_one_layer():
    """One weight used by two nn.Linear with their own biases: a weight layer with both
    calls, and a bias-only layer per bias (a bias is used by one call each)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))[:, :2]

    model = build(Tied)
    K = kfac(model, fisher_type="type-2")
    structure = [(layer.name, layer.weight_index, layer.bias_index) for layer in K._layers]
    index = {name: i for i, name in enumerate(K.param_names)}
    assert structure == [
        ("a", index["b.weight"], None),
        ("a.bias", None, index["a.bias"]),
        ("b", None, index["b.bias"]),
    ]
    assert K.factors["a"].input_factor.shape == (3, 3)
    assert K.factors["b"].bias_input_factor is not None


def test_batchnorm_in_training_mode_is_refused():
    model = build(lambda: nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' is in training mode.*model.eval\(\)"):
        kfac(model, params=list(model[0].parameters()))
    model.eval()
    kfac(model, params=list(model[0].parameters()))


def test_subset_of_parameters_and_layer_order():
    model = build(lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)))
    params = [model[2].bias, model[0].weight]  # shuffled subset: bias-only and weight-only layers
    K = kfac(model, params=params, fisher_type="type-2")
    assert [layer.name for layer in K._layers] == ["0", "2"]
    f0, f2 = K.factors["0"], K.factors["2"]
    assert f0.weight_name == "0.weight" and f0.bias_name is None and f0.bias_input_factor is None
    assert f2.input_factor is None and f2.bias_name == "2.bias"
    torch.testing.assert_close(f2.bias_input_factor, torch.tensor(1.0, dtype=DTYPE))
    assert K.shape == (2 + 9, 2 + 9)


def test_discovery_of_a_callable_and_its_unsupported_uses():
    from curvops.kronecker.discovery import discover_layers
    from curvops.risk import EmpiricalRisk

    model = build(lambda: nn.Sequential(nn.Linear(3, 2)))
    params = list(model.parameters())
    risk = EmpiricalRisk(
        lambda p, X: torch.nn.functional.linear(X, p[0], p[1]), nn.MSELoss(), params, data()
    )
    layers, fallback = discover_layers(risk, kfac_approx="expand", fallback=None, what="KFAC")
    found = [(ly.name, ly.type_name, ly.weight_index, ly.bias_index) for ly in layers]
    assert found == [("0", "Linear", 0, 1)]
    assert fallback == []
    risk = EmpiricalRisk(lambda p, X: X @ p[0].T + p[1], nn.MSELoss(), params, data())
    with pytest.raises(
        ValueError,
        match=r"Parameter '0' is used by torch.Tensor.T.__get__, which KFAC has no Kronecker "
        r"factors for \(supported: the weight \(and bias\) argument of F.linear.*"
        r"fallback='diagonal'",
    ):
        discover_layers(risk, kfac_approx="expand", fallback=None, what="KFAC")
    layers, fallback = discover_layers(
        risk, kfac_approx="expand", fallback=FallbackType.DIAGONAL, what="KFAC"
    )
    assert layers == [] and fallback == [0, 1]
