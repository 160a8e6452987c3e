"""Tests of ``curvops.linalg.estimators.hutchinson_trace``."""

import pytest
import torch
from helpers.estimator_problems import adaptive_run
from helpers.linalg_problems import (
    DTYPE,
    counting,
    estimator_trials,
    generator,
    power_law_matrix,
)

from curvops.linalg import BudgetExhaustedWarning, hutchinson_trace
from curvops.structured import TensorLinearOperator

NUM_RUNS = 200


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_unbiased_and_error_estimate_covers(distribution):
    M = power_law_matrix(200, c=1.0)
    estimates, errors = estimator_trials(
        hutchinson_trace, M, 20, NUM_RUNS, seed=0, distribution=distribution
    )
    truth = torch.trace(M)
    # unbiased: the mean of 200 runs lies within 4 of its standard errors of the truth
    assert (estimates.mean() - truth).abs() <= 4 * estimates.std() / NUM_RUNS**0.5
    # the error is the spread of one run (times the Student-t factor 1.07 at 20 samples):
    # compare with the empirical spread
    assert 0.85 < errors.mean() / estimates.std() < 1.3
    # NOTE [estimator error bars]: |est - t| <= 2 error in about 95% of runs
    assert ((estimates - truth).abs() <= 2 * errors).double().mean() >= 0.93


def test_rademacher_is_exact_on_diagonal_matrices():
    d = torch.arange(1.0, 31.0, dtype=DTYPE)
    est, err = hutchinson_trace(torch.diag(d), 3, generator=generator(1), return_error=True)
    assert est == d.sum() and err == 0


def test_tensor_list_operator_and_block_product():
    M = power_law_matrix(24, c=1.0)
    A = counting(M, in_shapes=[(4, 3), (12,)], out_shapes=[(4, 3), (12,)])
    hutchinson_trace(A, 10, generator=generator(2))
    assert (A.num_calls, A.num_columns) == (1, 10)


def test_adaptive_stopping_reaches_target_within_budget():
    M, A, est, err = adaptive_run(
        hutchinson_trace, 100, 0.5, 10, seed=3, target_rel_error=0.01, max_matvecs=2000
    )
    assert err / est.abs() <= 0.01
    assert A.num_columns % 10 == 0 and 10 < A.num_columns <= 2000
    assert (est - torch.trace(M)).abs() / torch.trace(M) < 0.04
    # a tight budget stops at the budget
    B = counting(M)
    with pytest.warns(BudgetExhaustedWarning):
        hutchinson_trace(B, 10, generator=generator(3), target_rel_error=1e-9, max_matvecs=25)
    assert B.num_columns == 25


def test_generator_reproducible_and_global_rng_untouched():
    M = power_law_matrix(30, c=1.0)
    state = torch.get_rng_state()
    a = hutchinson_trace(M, 5, generator=generator(4), distribution="normal")
    b = hutchinson_trace(M, 5, generator=generator(4), distribution="normal")
    assert a == b and torch.equal(torch.get_rng_state(), state)


def test_bad_inputs_raise():
    M = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="hutchinson_trace requires a square operator"):
        hutchinson_trace(TensorLinearOperator(torch.ones(3, 4, dtype=DTYPE)), 2)
    with pytest.raises(ValueError, match="Unknown distribution 'uniform'.*'rademacher'"):
        hutchinson_trace(M, 2, distribution="uniform")
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 1"):
        hutchinson_trace(M, 0)
    with pytest.raises(ValueError, match="with an error estimate needs num_matvecs >= 2"):
        hutchinson_trace(M, 1, return_error=True)
    with pytest.raises(ValueError, match="target_rel_error needs max_matvecs"):
        hutchinson_trace(M, 2, target_rel_error=0.1)
    with pytest.raises(ValueError, match="max_matvecs only applies with target_rel_error"):
        hutchinson_trace(M, 2, max_matvecs=10)
    with pytest.raises(ValueError, match=r"max_matvecs \(1\) must be at least num_matvecs \(2\)"):
        hutchinson_trace(M, 2, target_rel_error=0.1, max_matvecs=1)
    with pytest.raises(ValueError, match="target_rel_error must be a finite number > 0"):
        hutchinson_trace(M, 2, target_rel_error=-0.1, max_matvecs=10)
