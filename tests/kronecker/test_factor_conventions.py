"""The documented normalisation of KFAC's factors, their rescaling and shares, and the
gradient and loss of the Kronecker operators."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, batches, build, embedding_gain_problem, generator
from torch import nn

from curvops.curvature import GGNLinearOperator
from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator

N = 12


def classifier_problem(seed: int = 0):
    model = build(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), seed)
    g = generator(seed + 1)
    X = torch.randn(N, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, list(model.parameters()), batches(X, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_factors_are_normalised_as_documented(reduction, separate):
    """Last layer, empirical Fisher: A is the average of the (bias-augmented) inputs' outer
    products; B is R_D times the sum of the per-datum output gradients' outer products."""
    model, params, data = classifier_problem()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="empirical", separate_weight_and_bias=separate
    )
    f = K.factors["2"]
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    with torch.no_grad():
        h = torch.tanh(model[0](X))  # the last layer's inputs
        # gradient of the per-datum loss (sum over its one term) w.r.t. the logits
        r = torch.softmax(model[2](h), dim=1) - nn.functional.one_hot(y, 3).to(DTYPE)
    rows = h if separate else torch.cat([h, torch.ones(N, 1, dtype=DTYPE)], dim=1)
    R = 1.0 / N if reduction == "mean" else 1.0
    torch.testing.assert_close(f.input_factor, rows.T @ rows / N)
    torch.testing.assert_close(f.gradient_factor, R * r.T @ r)
    if separate:
        torch.testing.assert_close(f.bias_input_factor, torch.ones((), dtype=DTYPE))


def _kron_blocks(factors) -> list[torch.Tensor]:
    out = []
    for f in factors.values():
        A = torch.diag(f.input_factor) if f.diagonal_input else f.input_factor
        first, second = (A, f.gradient_factor) if f.diagonal_input else (f.gradient_factor, A)
        out.append(torch.kron(first, second))
        if f.bias_input_factor is not None:
            out.append(f.bias_input_factor * f.gradient_factor)
    return out


def test_scaled_multiplies_the_factors_and_leaves_the_original():
    model, params, data = embedding_gain_problem()
    K = KFACLinearOperator(
        model, nn.MSELoss(), params, data, fisher_type="type-2", fallback="diagonal"
    )
    before = _kron_blocks(K.factors)
    scaled = {name: f.scaled(input_scale=3.0, gradient_scale=0.25) for name, f in K.factors.items()}
    for name, f in scaled.items():
        torch.testing.assert_close(f.gradient_factor, 0.25 * K.factors[name].gradient_factor)
        torch.testing.assert_close(f.input_factor, 3.0 * K.factors[name].input_factor)
    for new, old in zip(_kron_blocks(scaled), before):
        torch.testing.assert_close(new, 0.75 * old)
    for new, old in zip(_kron_blocks(K.factors), before):  # the operator's own are unchanged
        torch.testing.assert_close(new, old)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_scaled_refuses_bad_scales(bad):
    f = next(iter(KFACLinearOperator(*_cls_args()).factors.values()))
    with pytest.raises(ValueError, match="input_scale must be a finite non-negative number"):
        f.scaled(input_scale=bad)
    with pytest.raises(ValueError, match="gradient_scale must be a finite non-negative number"):
        f.scaled(gradient_scale=bad)


def _cls_args():
    model, params, data = classifier_problem()
    return model, nn.CrossEntropyLoss(), params, data


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shares_of_batches_add_up_to_the_whole_data_set(reduction, fisher_type):
    """Per-batch operators' shares, added factor by factor, equal the operator over all data
    (sequences with the same number of positions per datum; uneven batches)."""
    model, params, data = embedding_gain_problem()
    loss = nn.MSELoss(reduction=reduction)
    options = {"fisher_type": fisher_type, "fallback": "diagonal", "check_deterministic": False}
    whole = KFACLinearOperator(model, loss, params, data, **options).factors
    total = {}
    for batch in data:
        K = KFACLinearOperator(model, loss, params, [batch], **options)
        for name, f in K.factors_as_share_of(N).items():
            parts = total.setdefault(name, [])
            parts.append(f)
    for name, f in whole.items():
        parts = total[name]
        torch.testing.assert_close(sum(p.input_factor for p in parts), f.input_factor)
        if f.bias_input_factor is not None:
            torch.testing.assert_close(sum(p.bias_input_factor for p in parts), f.bias_input_factor)
        torch.testing.assert_close(sum(p.gradient_factor for p in parts), f.gradient_factor)


def test_share_of_the_operators_own_data_is_its_factors():
    K = KFACLinearOperator(*_cls_args(), fisher_type="type-2")
    for name, f in K.factors_as_share_of(N).items():
        torch.testing.assert_close(f.input_factor, K.factors[name].input_factor)
        torch.testing.assert_close(f.gradient_factor, K.factors[name].gradient_factor)


@pytest.mark.parametrize(
    "num_data, fisher_type, match",
    [
        (N - 1, "type-2", "a data set containing this operator's 12 data"),
        (12.5, "type-2", "an integer >= 12"),
        (20, "forward-only", "forward-only' sets the gradient factors to the identity"),
    ],
)
def test_share_errors(num_data, fisher_type, match):
    K = KFACLinearOperator(*_cls_args(), fisher_type=fisher_type)
    with pytest.raises(ValueError, match=match):
        K.factors_as_share_of(num_data)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_and_loss_match_the_exact_operators(cls, reduction):
    model, params, data = classifier_problem()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    K = cls(model, loss, params[1:], data, fisher_type="type-2")  # a subset, any order
    G = GGNLinearOperator(model, loss, params[1:], data)
    (grads, value), (grads_ref, value_ref) = K.gradient_and_loss(), G.gradient_and_loss()
    torch.testing.assert_close(value, value_ref)
    assert [g.shape for g in grads] == [p.shape for p in params[1:]]
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    # independently: the full-batch loss and autograd
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    expected = torch.autograd.grad(loss(model(X), y), params[1:])
    torch.testing.assert_close(value, loss(model(X), y).detach())
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert all(p.grad is None for p in params)
    assert K.num_data == N
