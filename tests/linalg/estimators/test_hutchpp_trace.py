"""Tests of ``curvops.linalg.estimators.hutchpp_trace``."""

import pytest
import torch
from helpers.estimator_problems import adaptive_run
from helpers.linalg_problems import (
    DTYPE,
    FIG4_DIM,
    FIG4_RUNS,
    counting,
    fig4_trials,
    generator,
    power_law_matrix,
    relative_trace_errors,
)

from curvops.linalg import hutchpp_trace


@pytest.mark.parametrize("c", [1.0, 3.0])
def test_unbiased_and_error_estimate_covers(c):
    M = power_law_matrix(FIG4_DIM, c=c)
    estimates, errors = fig4_trials("hutchpp_trace", c, 30, seed=0)
    truth = torch.trace(M)
    assert (estimates.mean() - truth).abs() <= 4 * estimates.std() / FIG4_RUNS**0.5
    # Hutchinson part with 10 samples: P(|T_9| <= 2) ~ 0.92
    assert ((estimates - truth).abs() <= 2 * errors).double().mean() >= 0.85


@pytest.mark.parametrize("c, factor", [(2.0, 10.0), (3.0, 100.0)])
def test_beats_hutchinson_on_fast_spectral_decay(c, factor):
    M = power_law_matrix(FIG4_DIM, c=c)
    hutch, _ = fig4_trials("hutchinson_trace", c, 30, seed=1)
    hpp, _ = fig4_trials("hutchpp_trace", c, 30, seed=0)
    median_hutch = relative_trace_errors(hutch, M).median()
    median_hpp = relative_trace_errors(hpp, M).median()
    assert median_hpp * factor < median_hutch


def test_exact_for_low_rank_and_two_block_products():
    U = torch.randn(50, 4, generator=generator(3), dtype=DTYPE)
    A = counting(U @ U.T)
    est = hutchpp_trace(A, 15, generator=generator(4))  # sketch of 5 > rank 4
    torch.testing.assert_close(est, (U * U).sum(), rtol=1e-10, atol=1e-10)
    assert (A.num_calls, A.num_columns) == (2, 15)


def test_adaptive_stopping_adds_deflated_samples():
    M, A, est, err = adaptive_run(
        hutchpp_trace, 100, 1.0, 12, seed=5, target_rel_error=1e-2, max_matvecs=2000
    )
    assert err / est.abs() <= 1e-2
    assert 12 < A.num_columns < 2000 and A.num_columns % 4 == 0
    assert (est - torch.trace(M)).abs() / torch.trace(M) < 4e-2


def test_bad_inputs_raise():
    M = torch.eye(5, dtype=DTYPE)
    with pytest.raises(ValueError, match="hutchpp_trace needs num_matvecs divisible by 3"):
        hutchpp_trace(M, 10)
    with pytest.raises(ValueError, match="num_matvecs <= 15.*cannot exceed the dimension 5"):
        hutchpp_trace(M, 18)
    with pytest.raises(ValueError, match="with an error estimate needs num_matvecs >= 6"):
        hutchpp_trace(M, 3, return_error=True)
    with pytest.raises(ValueError, match="requires a square operator"):
        hutchpp_trace(torch.ones(5, 4, dtype=DTYPE), 3)
    with pytest.raises(ValueError, match="Unknown distribution"):
        hutchpp_trace(M, 3, distribution="gaussian")
