"""KFAC's interface: closed forms, factors, state dict, option errors, the caller's state."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, batches, build, embedding_gain_problem, generator
from torch import nn

from curvops.curvature import NonDeterministicError
from curvops.kronecker import KFACLinearOperator, LayerFactors

N, T = 12, 3


def make(separate=True, **kwargs):
    model, params, data = embedding_gain_problem()
    options = {"fisher_type": "type-2", "fallback": "diagonal"} | kwargs
    return KFACLinearOperator(
        model, nn.MSELoss(), params, data, separate_weight_and_bias=separate, **options
    )


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_closed_forms_match_dense(separate):
    K = make(separate)
    dense = K.to_dense()
    torch.testing.assert_close(K.trace(), dense.trace())
    torch.testing.assert_close(K.frobenius_norm(), torch.linalg.matrix_norm(dense))
    sign, logabsdet = torch.linalg.slogdet(dense)
    assert sign == 1
    torch.testing.assert_close(K.logdet(), logabsdet)
    torch.testing.assert_close(K.det(), torch.linalg.det(dense))


def test_logdet_of_singular_kfac_is_minus_infinity():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)))
    g = generator(2)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE), torch.randn(N, 2, generator=g, dtype=DTYPE)
    )
    K = KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, fisher_type="type-2"
    )
    assert K.logdet() == float("-inf")
    assert K.det() == 0


def test_factors_describe_layers():
    K = make(separate=False)
    assert list(K.factors) == ["emb", "lin", "out"]
    f = K.factors["lin"]
    assert isinstance(f, LayerFactors)
    assert (f.weight_name, f.bias_name, f.joint) == ("lin.weight", "lin.bias", True)
    assert f.input_factor.shape == (4, 4) and f.gradient_factor.shape == (4, 4)
    assert f.bias_input_factor is None and not f.diagonal_input
    assert K.factors["emb"].diagonal_input and K.factors["emb"].input_factor.shape == (8,)
    assert set(K.fallback_diagonals) == {"gain"}
    sep = make(separate=True).factors["lin"]
    assert sep.input_factor.shape == (3, 3) and sep.bias_input_factor.shape == ()


def test_factors_are_computed_once_on_first_use(monkeypatch):
    K = make()
    calls = []
    original = KFACLinearOperator.compute_factors
    monkeypatch.setattr(
        KFACLinearOperator, "compute_factors", lambda self: calls.append(1) or original(self)
    )
    v = torch.randn(K.shape[0], generator=generator(0), dtype=DTYPE)
    K @ v, K @ v, K.trace(), K.factors
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fisher_type": "hessian"}, ValueError, "Unknown fisher_type='hessian'. Use one of"),
        ({"kfac_approx": "sum"}, ValueError, "Unknown kfac_approx='sum'"),
        ({"fallback": "zero"}, ValueError, "Unknown fallback='zero'"),
        (
            {"fisher_type": "type-2", "mc_samples": 3},
            ValueError,
            "only applies to fisher_type='mc'",
        ),
        ({"mc_samples": 0}, ValueError, "mc_samples must be an integer >= 1, got 0"),
        ({"mc_samples": True}, TypeError, "mc_samples must be an integer, got bool"),
        ({"seed": 1.5}, TypeError, "seed must be an integer, got float"),
        ({"seed": 2**70}, ValueError, "seed must lie in"),
        ({"num_data": -8}, ValueError, "num_data must be an integer >= 1, got -8"),
        ({"on_stale": "never"}, ValueError, "Unknown on_stale='never'"),
        ({"num_per_example_loss_terms": 0}, ValueError, "num_per_example_loss_terms must be"),
        ({"separate_weight_and_bias": "yes"}, TypeError, "must be a bool"),
        ({"fisher_type": "forward-only"}, ValueError, "fallback='diagonal' needs backpropagated"),
    ],
)
def test_bad_options(kwargs, error, match):
    model, params, data = embedding_gain_problem()
    options = {"fallback": "diagonal"} | kwargs
    with pytest.raises(error, match=match):
        KFACLinearOperator(model, nn.MSELoss(), params, data, **options)


def test_callable_model_and_loss_is_required():
    """A callable running the module with the parameters it is given (a dict) gives the
    module's factors and fallback diagonals, its layers named like the modules."""
    model, _, data = embedding_gain_problem()
    params = dict(model.named_parameters())

    def forward(p, X):
        return torch.func.functional_call(model, p, (X,))

    options = {"fisher_type": "type-2", "fallback": "diagonal"}
    K = KFACLinearOperator(forward, nn.MSELoss(), params, data, **options)
    K_module = KFACLinearOperator(model, nn.MSELoss(), params, data, **options)
    assert list(K.factors) == list(K_module.factors) == ["emb", "lin", "out"]
    torch.testing.assert_close(K.to_dense(), K_module.to_dense(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a loss function"):
        KFACLinearOperator(model, None, params, data)


def test_loss_without_likelihood_is_refused():
    model, params, data = embedding_gain_problem()
    with pytest.raises(NotImplementedError, match="needs a likelihood interpretation"):
        KFACLinearOperator(model, nn.L1Loss(), params, data, fallback="diagonal")


def test_nondeterministic_model_is_detected():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
    g = generator(3)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE), torch.randn(N, 2, generator=g, dtype=DTYPE)
    )
    with pytest.raises(NonDeterministicError, match="dropout"):
        KFACLinearOperator(model, nn.MSELoss(), list(model.parameters()), data)


def test_callers_state_is_untouched():
    model, params, data = embedding_gain_problem()
    model.lin.weight.grad = None
    model.out.bias.requires_grad_(True)
    model.eval()
    rng = torch.get_rng_state()
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="mc", fallback="diagonal")
    K.compute_factors()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_existing_grads_are_untouched(fisher_type):
    """The statistics pass runs the module itself; .grad of every parameter stays as it was."""
    model, params, data = embedding_gain_problem()
    grads = [torch.full_like(p, float(i)) for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    fallback = None if fisher_type == "forward-only" else "diagonal"
    if fallback is None:
        params = [p for p in params if p is not model.gain]
    K = KFACLinearOperator(
        model, nn.MSELoss(), params, data, fisher_type=fisher_type, fallback=fallback
    )
    K.compute_factors()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_recording_mode_is_removed_after_an_error():
    """A weight used another way than on the first batch: a clear error, and no torch function
    mode is left behind."""

    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            if x.shape[0] == 3:
                return self.lin(x)
            return x @ self.lin.weight.T + self.lin.bias

    model = build(Switch)
    data = [(torch.randn(n, 2, dtype=DTYPE), torch.randn(n, 2, dtype=DTYPE)) for n in (3, 2)]
    K = KFACLinearOperator(model, nn.MSELoss(), list(model.parameters()), data)
    with pytest.raises(ValueError, match=r"'lin.weight' is used by torch.Tensor.T.__get__"):
        K.compute_factors()
    assert torch._C._len_torch_function_stack() == 0
    assert not model.lin._forward_hooks


def test_eigendecomposition_of_unknown_layer():
    K = make()
    lam, Q = K.eigendecomposition("lin", "input")
    torch.testing.assert_close((Q * lam) @ Q.T, K.factors["lin"].input_factor)
    with pytest.raises(KeyError, match="No layer 'nope'"):
        K.eigendecomposition("nope", "input")
