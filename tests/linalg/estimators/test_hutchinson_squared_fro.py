"""Tests of ``hutchinson_squared_fro`` and ``hutchinson_squared_fro_halved``."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, estimator_trials, generator

from curvops.linalg import hutchinson_squared_fro, hutchinson_squared_fro_halved


def _rectangular():
    return torch.randn(40, 25, generator=generator(0), dtype=DTYPE) / 5


@pytest.mark.parametrize("estimator", [hutchinson_squared_fro, hutchinson_squared_fro_halved])
def test_unbiased_and_error_estimate_covers(estimator):
    M = _rectangular()
    truth = (M**2).sum()
    estimates, errors = estimator_trials(estimator, M, 20, 200, seed=1)
    assert (estimates.mean() - truth).abs() <= 4 * estimates.std() / 200**0.5
    assert ((estimates - truth).abs() <= 2 * errors).double().mean() >= 0.85


def test_halved_variant_halves_the_variance_for_the_same_budget():
    # with Gaussian vectors both sample variances are 2 ||A A^T||_F^2 = 2 ||A^T A||_F^2, and the
    # halved variant averages twice as many samples
    M = _rectangular()
    full, _ = estimator_trials(hutchinson_squared_fro, M, 20, 200, seed=2, distribution="normal")
    halved, _ = estimator_trials(
        hutchinson_squared_fro_halved, M, 20, 200, seed=3, distribution="normal"
    )
    assert 0.3 < halved.var() / full.var() < 0.8


def test_number_of_products():
    M = _rectangular()
    A, B = counting(M), counting(M)
    hutchinson_squared_fro(A, 10, generator=generator(4))
    hutchinson_squared_fro_halved(B, 10, generator=generator(4))
    assert (A.num_calls, A.num_columns) == (2, 10)  # A^T V, then A (A^T V)
    assert (B.num_calls, B.num_columns) == (1, 10)


def test_bad_inputs_raise():
    M = _rectangular()
    with pytest.raises(ValueError, match="two products per sample.*divisible by 2"):
        hutchinson_squared_fro(M, 5)
    with pytest.raises(ValueError, match="hutchinson_squared_fro.*needs num_matvecs >= 4"):
        hutchinson_squared_fro(M, 2, return_error=True)
    with pytest.raises(
        ValueError,
        match="hutchinson_squared_fro_halved with an error estimate needs num_matvecs >= 2",
    ):
        hutchinson_squared_fro_halved(M, 1, return_error=True)
    with pytest.raises(ValueError, match="Unknown distribution"):
        hutchinson_squared_fro_halved(M, 3, distribution="sign")


@pytest.mark.parametrize("estimator", [hutchinson_squared_fro, hutchinson_squared_fro_halved])
def test_adaptive_stopping_reaches_target_within_budget(estimator):
    M = _rectangular()
    A = counting(M)
    est, err = estimator(
        A, 10, generator=generator(5), return_error=True, target_rel_error=0.02, max_matvecs=4000
    )
    assert err / est <= 0.02 and 10 < A.num_columns <= 4000 and A.num_columns % 10 == 0
    assert (est - (M**2).sum()).abs() / (M**2).sum() < 0.06
    B = counting(M)  # a tight, odd budget: the two-product estimator stops at 24
    with pytest.warns(UserWarning, match="stopped at a relative error"):
        estimator(B, 10, generator=generator(5), target_rel_error=1e-9, max_matvecs=25)
    assert B.num_columns == (24 if estimator is hutchinson_squared_fro else 25)


def test_adaptive_options_are_checked():
    M = _rectangular()
    with pytest.raises(ValueError, match="target_rel_error needs max_matvecs"):
        hutchinson_squared_fro(M, 4, target_rel_error=0.1)
    with pytest.raises(ValueError, match="max_matvecs only applies with target_rel_error"):
        hutchinson_squared_fro_halved(M, 4, max_matvecs=10)
