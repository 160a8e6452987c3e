"""Tests of ``curvops.linalg.estimators.hutchinson_diag``."""

import pytest
import torch
from helpers.estimator_problems import adaptive_run
from helpers.linalg_problems import (
    DTYPE,
    FIG4_DIM,
    FIG4_RUNS,
    assert_unbiased_entrywise,
    estimator_trials,
    fig4_trials,
    generator,
    power_law_matrix,
    relative_diag_errors,
)

from curvops.linalg import hutchinson_diag


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_unbiased_and_error_estimate_covers(distribution):
    M = power_law_matrix(FIG4_DIM, c=1.0)
    if distribution == "rademacher":
        estimates, errors = fig4_trials("hutchinson_diag", 1.0, 30, seed=0)
    else:
        estimates, errors = estimator_trials(
            hutchinson_diag, M, 30, FIG4_RUNS, seed=0, distribution="normal"
        )
    truth = torch.diagonal(M)
    assert_unbiased_entrywise(estimates, truth)
    assert ((estimates - truth).abs() <= 2 * errors).double().mean() >= 0.85


def test_rademacher_is_exact_on_diagonal_matrices():
    d = torch.linspace(-1.0, 2.0, 20, dtype=DTYPE)
    est, err = hutchinson_diag(torch.diag(d), 2, generator=generator(1), return_error=True)
    assert torch.equal(est, d) and (err == 0).all()


def test_adaptive_stopping_and_one_block_product_per_round():
    M, A, est, err = adaptive_run(
        hutchinson_diag, 60, 2.0, 50, seed=2, target_rel_error=0.05, max_matvecs=5000
    )
    assert err.max() / est.abs().max() <= 0.05
    assert A.num_columns == 50 * A.num_calls and A.num_calls > 1
    assert relative_diag_errors(est, M) < 0.2


def test_bad_inputs_raise():
    M = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="hutchinson_diag requires a square operator"):
        hutchinson_diag(torch.ones(3, 4, dtype=DTYPE), 2)
    with pytest.raises(ValueError, match="Unknown distribution"):
        hutchinson_diag(M, 2, distribution="cauchy")
    with pytest.raises(ValueError, match="with an error estimate needs num_matvecs >= 2"):
        hutchinson_diag(M, 1, return_error=True)
    with pytest.raises(TypeError, match="num_matvecs must be an integer"):
        hutchinson_diag(M, 2.0)
    with pytest.raises(ValueError, match="target_rel_error needs max_matvecs"):
        hutchinson_diag(M, 2, target_rel_error=0.1)
