"""Factors computed at old parameters are never used silently (NOTE [stale factors])."""

import pytest
import torch
from helpers.operator_zoo import classification_batches, mlp, random_vector
from torch import nn

from curvops import (
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    StaleFactorsError,
)

CLASSES = [KFACLinearOperator, EKFACLinearOperator]


def _problem():
    model, data = mlp(), classification_batches()
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def _build(cls, model, loss, params, data, **kwargs):
    return cls(model, loss, params, data, fisher_type="type-2", **kwargs)


def _inverse(K):
    if isinstance(K, EKFACLinearOperator):
        return EKFACInverseLinearOperator(K, damping=1e-2)
    return KFACInverseLinearOperator(K, damping=1e-2)


def _optimizer_step(model, data):
    """One SGD step (in place, as every torch optimiser does)."""
    X, y = data[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.CrossEntropyLoss()(model(X), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cls", CLASSES)
def test_product_after_an_optimizer_step_raises(cls):
    model, loss, params, data = _problem()
    K = _build(cls, model, loss, params, data)
    inverse = _inverse(K)
    v = random_vector(K)
    K @ v
    _optimizer_step(model, data)
    match = rf"{cls.__name__}: the parameters '0.weight', .* changed in place.*compute_factors\(\)"
    with pytest.raises(StaleFactorsError, match=match):
        K @ v
    for use in [K.trace, K.logdet, K.to_block_diagonal, lambda: K.factors, K.state_dict]:
        with pytest.raises(StaleFactorsError):
            use()
    with pytest.raises(StaleFactorsError, match="build a new inverse"):
        inverse @ v

    K.compute_factors()  # the fix the message names
    fresh = _build(cls, model, loss, params, data)
    torch.testing.assert_close(K @ v, fresh @ v, rtol=1e-12, atol=1e-14)
    with pytest.raises(StaleFactorsError, match="build a new inverse"):
        inverse @ v  # still factorised from the old factors
    torch.testing.assert_close(_inverse(K) @ v, _inverse(fresh) @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_recompute_when_asked(cls):
    model, loss, params, data = _problem()
    K = _build(cls, model, loss, params, data, on_stale="recompute")
    inverse = _inverse(K)
    v = random_vector(K)
    before, inverse_before = K @ v, inverse @ v
    with torch.no_grad():
        params[0].mul_(1.5)
    fresh = _build(cls, model, loss, params, data)
    after = K @ v
    torch.testing.assert_close(after, fresh @ v, rtol=1e-12, atol=1e-14)
    assert (after - before).abs().max() > 1e-3
    inverse_after = inverse @ v
    torch.testing.assert_close(inverse_after, _inverse(fresh) @ v, rtol=1e-10, atol=1e-12)
    assert (inverse_after - inverse_before).abs().max() > 1e-3


@pytest.mark.parametrize("cls", CLASSES)
def test_ignore_keeps_the_old_factors(cls):
    model, loss, params, data = _problem()
    K = _build(cls, model, loss, params, data, on_stale="ignore")
    inverse = _inverse(K)
    v = random_vector(K)
    before, inverse_before = K @ v, inverse @ v
    _optimizer_step(model, data)
    torch.testing.assert_close(K @ v, before, rtol=0, atol=0)
    torch.testing.assert_close(inverse @ v, inverse_before, rtol=0, atol=0)


def test_replaced_parameter_data_and_loaded_model_weights_are_detected():
    model, loss, params, data = _problem()
    K = _build(KFACLinearOperator, model, loss, params, data)
    K.compute_factors()
    params[2].data = params[2].data.clone()  # new storage
    with pytest.raises(StaleFactorsError, match="'2.weight'"):
        K @ random_vector(K)
    K.compute_factors()
    model.load_state_dict(mlp(seed=5).state_dict())
    with pytest.raises(StaleFactorsError, match="'0.weight', '0.bias', '2.weight', '2.bias'"):
        K @ random_vector(K)


def test_no_false_alarms():
    """Products, closed forms, state round trips and the statistics pass change no version."""
    model, loss, params, data = _problem()
    E = _build(EKFACLinearOperator, model, loss, params, data)
    v = random_vector(E)
    for _ in range(3):
        E @ v
        E.trace()
        _inverse(E) @ v
    K = _build(KFACLinearOperator, model, loss, params, data, fallback="diagonal")
    K.logdet()
    K.load_state_dict(K.state_dict())
    K.compute_factors()
    K @ v
    _inverse(K) @ v


def test_loading_a_state_marks_the_factors_fresh():
    model, loss, params, data = _problem()
    K = _build(KFACLinearOperator, model, loss, params, data)
    state = K.state_dict()
    _optimizer_step(model, data)
    K.load_state_dict(state)  # the caller vouches that the state fits the current parameters
    K @ random_vector(K)
