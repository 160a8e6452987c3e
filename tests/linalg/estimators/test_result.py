"""Tests of ``EstimateWithError`` and ``BudgetExhaustedWarning`` (budget warnings)."""

import pickle
import warnings

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, generator, power_law_matrix

import curvops.linalg as la
from curvops.linalg import BudgetExhaustedWarning, EstimateWithError

SQUARE = ["hutchinson_trace", "hutchpp_trace", "xtrace", "hutchinson_diag", "xdiag"]
FRO = ["hutchinson_squared_fro", "hutchinson_squared_fro_halved"]


@pytest.mark.parametrize("name", SQUARE + FRO)
def test_budget_exhausted_warns_and_flags(name):
    M = power_law_matrix(60, c=0.5)
    A = counting(M)
    with pytest.warns(BudgetExhaustedWarning) as record:
        result = getattr(la, name)(
            A, 12, generator=generator(0), return_error=True, target_rel_error=1e-6, max_matvecs=36
        )
    message = str(record[0].message)
    assert name in message and "36 products" in message and "1e-06" in message
    assert f"{result.relative_error:.3g}" in message and "Raise max_matvecs" in message
    assert record[0].filename == __file__  # points at the caller
    assert isinstance(result, EstimateWithError) and isinstance(result, tuple)
    assert not result.target_reached and result.num_matvecs == A.num_columns == 36
    assert result.target_rel_error == 1e-6 and result.method == name
    est, err = result  # unpacks like the old pair
    assert est is result.estimate and err is result.error


@pytest.mark.parametrize("name", SQUARE + FRO)
def test_target_reached_does_not_warn(name):
    M = power_law_matrix(60, c=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetExhaustedWarning)
        result = getattr(la, name)(
            M, 12, generator=generator(1), return_error=True, target_rel_error=0.5, max_matvecs=600
        )
    assert result.target_reached and result.relative_error <= 0.5


@pytest.mark.parametrize("name", SQUARE)
def test_warns_without_return_error_too(name):
    with pytest.warns(BudgetExhaustedWarning, match=name):
        out = getattr(la, name)(
            power_law_matrix(40, c=0.5),
            8 if name != "hutchpp_trace" else 9,
            generator=generator(2),
            target_rel_error=1e-9,
            max_matvecs=18,
        )
    assert isinstance(out, torch.Tensor) and not isinstance(out, tuple)


def test_sketch_at_dimension_says_so():
    # XTrace's sketch stops growing at the dimension: the budget is not what ran out
    M = torch.randn(8, 8, generator=generator(3), dtype=DTYPE)
    M = M @ M.T
    with pytest.warns(BudgetExhaustedWarning, match="reached the dimension"):
        la.xtrace(M, 4, generator=generator(4), target_rel_error=1e-30, max_matvecs=100)


def test_without_target_the_result_is_flagged_reached():
    result = la.hutchinson_trace(
        power_law_matrix(30, c=1.0), 6, generator=generator(5), return_error=True
    )
    assert result.target_reached and result.target_rel_error is None and result.num_matvecs == 6
    assert "EstimateWithError(estimate=" in repr(result)


def test_pickles_with_its_attributes():
    result = la.xdiag(power_law_matrix(30, c=1.0), 8, generator=generator(6), return_error=True)
    copy = pickle.loads(pickle.dumps(result))
    assert isinstance(copy, EstimateWithError) and copy.num_matvecs == 8
    torch.testing.assert_close(copy.estimate, result.estimate)
    torch.testing.assert_close(copy.error, result.error)


def test_exported_from_the_estimators_package():
    from curvops.linalg import estimators

    assert estimators.BudgetExhaustedWarning is BudgetExhaustedWarning
    assert issubclass(BudgetExhaustedWarning, UserWarning)
    assert estimators.EstimateWithError is EstimateWithError
