"""NaN and Inf give one clear FloatingPointError in every operator (NOTE [non-finite values])."""

import pytest
import torch
from helpers.operator_zoo import (
    OPERATOR_KINDS,
    build_operator,
    classification_batches,
    mlp,
    random_vector,
)
from torch import nn

from curvops import (
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvops.risk import EmpiricalRisk, check_deterministic

NON_FINITE = r"NaN or Inf in the (loss|gradient|product|factors of Linear '0'|eigenvalue corr)"


def _problem():
    model, data = mlp(), classification_batches()
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_nan_parameter(kind, check):
    model, loss, params, data = _problem()
    with torch.no_grad():
        params[0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=NON_FINITE):
        A = build_operator(kind, model, loss, params, data, check_deterministic=check)
        A @ random_vector(A)


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_inf_in_data_unchecked(kind):
    model, loss, params, data = _problem()
    X, y = data[1]
    data[1] = (torch.full_like(X, float("inf")), y)
    A = build_operator(kind, model, loss, params, data, check_deterministic=False)
    with pytest.raises(FloatingPointError, match=f"{type(A).__name__}: {NON_FINITE}"):
        A @ random_vector(A)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_inf_in_data_kfac_types(fisher_type):
    model, loss, params, data = _problem()
    X, y = data[0]
    data[0] = (torch.full_like(X, float("inf")), y)
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type=fisher_type, check_deterministic=False
    )
    with pytest.raises(FloatingPointError, match="KFACLinearOperator: NaN or Inf in the factors"):
        K @ random_vector(K)


def test_gradient_and_loss_refuse_nan():
    model, loss, params, data = _problem()
    A = build_operator("ggn", model, loss, params, data)
    with torch.no_grad():
        params[2][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="GGNLinearOperator: NaN or Inf in the loss"):
        A.gradient_and_loss()


def test_determinism_check_never_compares_nan():
    model, loss, params, data = _problem()
    risk = EmpiricalRisk(model, loss, params, data)
    nan = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    probe = {"loss": torch.ones(1, dtype=torch.float64), "product": nan}
    with pytest.raises(FloatingPointError, match="Op: NaN or Inf in the product"):
        check_deterministic(risk, lambda: probe, owner="Op", what="loss and a product")
    with pytest.raises(FloatingPointError, match="Op: NaN or Inf in the thing"):
        check_deterministic(risk, lambda: nan, owner="Op", what="thing")
    empty = torch.zeros(0, dtype=torch.float64)
    check_deterministic(risk, lambda: {"product": empty}, owner="Op", what="nothing")


def test_loaded_non_finite_factors_are_refused():
    model, loss, params, data = _problem()
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    state = K.state_dict()
    state["factors"]["0"]["input_factor"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf in the factors of Linear '0'"):
        K.load_state_dict(state)
    E = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    state = E.state_dict()
    state["eigenvalue_corrections"]["2"]["weight"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="eigenvalue corrections of layer '2'"):
        E.load_state_dict(state)


def test_non_finite_inputs_of_kronecker_operators():
    model, loss, params, data = _problem()
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    E = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    operators = [
        K,
        E,
        KFACInverseLinearOperator(K, damping=1e-3),
        EKFACInverseLinearOperator(E, damping=1e-3),
    ]
    for A in operators:
        v = random_vector(A)
        v[3] = float("nan")
        with pytest.raises(ValueError, match=f"input to {type(A).__name__} contains NaN or Inf"):
            A @ v


def test_all_finite_one_check_for_many_tensors():
    from curvops.risk.finite import all_finite

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows
    assert all_finite([big, torch.ones(3, dtype=torch.float64)])
    assert all_finite([]) and all_finite([torch.zeros(0)])
    assert all_finite([torch.tensor([1, 2]), torch.ones(2, 2)])  # integer and float
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite([big, torch.tensor([1.0, bad]), torch.ones(2)])
    assert not all_finite([torch.tensor([complex(1.0, float("nan"))])])
