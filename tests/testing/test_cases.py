"""Tests of the shared test-case registry ``tests/cases.py``."""

import pytest
import torch
from cases import (
    CASE_FACTORIES,
    FISHER_CASES,
    MEAN_CASES,
    MODULE_CASES,
    Case,
    QuarticLoss,
    ToChannelsFirst,
    case_ids,
    make_case,
)
from torch import nn


def _float_tensors(case: Case):
    yield from case.param_list
    for X, y in case.data:
        yield from X.values() if isinstance(X, dict) else [X]
        if y.is_floating_point():
            yield y


def test_case_is_small_float64_and_in_eval_mode(case: Case):
    assert case.name in CASE_FACTORIES
    assert all(t.dtype == torch.float64 for t in _float_tensors(case))
    assert 0 < case.dim <= 250
    assert 0 < case.num_data <= 12
    assert case.loss_func.reduction in ("mean", "sum")
    if isinstance(case.model_func, nn.Module):
        assert not case.model_func.training
        assert not any(isinstance(m, nn.Dropout) for m in case.model_func.modules())
        model_params = {id(p) for p in case.model_func.parameters()}
        assert all(id(p) in model_params for p in case.param_list)
    assert case.supports_fisher == (case.name in FISHER_CASES)


def test_make_case_is_fresh_deterministic_and_leaves_rng_alone(case: Case):
    state = torch.get_rng_state()
    again = make_case(case.name)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p is not q for p, q in zip(case.param_list, again.param_list))
    if isinstance(case.model_func, nn.Module):
        assert case.model_func is not again.model_func
    for p, q in zip(case.param_list, again.param_list):
        assert torch.equal(p, q)
    for (X1, y1), (X2, y2) in zip(case.data, again.data):
        X1, X2 = (X1["x"], X2["x"]) if isinstance(X1, dict) else (X1, X2)
        assert torch.equal(X1, X2) and torch.equal(y1, y2)


def test_registry_covers_the_required_variations():
    names = case_ids()
    for loss in ("mse", "ce", "bce"):
        for reduction in ("mean", "sum"):
            case = make_case(f"mlp-{loss}-{reduction}")
            assert [X.shape[0] for X, _ in case.data] == [4, 3, 5]
    assert len(make_case("single-batch-mse-sum").data) == 1
    assert make_case("dict-input-mse-mean").batch_size_fn is not None
    assert isinstance(make_case("functional-ce-sum").params, dict)
    assert not make_case("custom-quartic-mean").supports_fisher
    assert "custom-quartic-mean" not in FISHER_CASES
    assert "functional-ce-sum" not in MODULE_CASES
    assert set(MEAN_CASES) < set(names) and "mlp-mse-sum" not in MEAN_CASES
    seq = make_case("seq-ce-mean")
    X, y = seq.data[0]
    assert seq.model_func(X).shape == (X.shape[0], 3, y.shape[1])  # [N, C, T]


def test_make_case_unknown_name():
    with pytest.raises(KeyError, match="Unknown case 'nope'; known cases: mlp-mse-mean"):
        make_case("nope")


def test_quartic_loss_and_permutation():
    f = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.zeros_like(f)
    assert QuarticLoss("sum")(f, y).item() == pytest.approx(0.5 * (1 + 16 + 0 + 1))
    assert QuarticLoss("mean")(f, y).item() == pytest.approx(0.5 * 18 / 4)
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(ToChannelsFirst()(x), x.transpose(1, 2))
