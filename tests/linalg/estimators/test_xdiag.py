"""Tests of ``curvops.linalg.estimators.xdiag``."""

import pytest
import torch
from helpers.estimator_problems import (
    adaptive_run,
    explicit_leave_one_out,
    grown_leave_one_out_sketch,
)
from helpers.linalg_problems import (
    DTYPE,
    FIG4_DIM,
    assert_unbiased_entrywise,
    counting,
    estimator_trials,
    fig4_trials,
    generator,
    power_law_matrix,
    relative_diag_errors,
)

from curvops.linalg import xdiag
from curvops.linalg.estimators.xdiag import _xdiag_samples


@pytest.mark.parametrize("growth", [[5], [1, 4], [2, 2, 1]])
def test_leave_one_out_estimates_match_explicit_formula(growth):
    """Each d_i against its definition with an explicit QR of A Omega_{-i} (non-symmetric A)."""
    M, Omega, sketch = grown_leave_one_out_sketch(20, growth, transpose_products=True)
    expected = [
        torch.diagonal(Q_i @ Q_i.T @ M) + w * (P @ M @ w)
        for Q_i, P, w in explicit_leave_one_out(M, Omega)
    ]
    torch.testing.assert_close(_xdiag_samples(sketch)[0], torch.stack(expected, dim=1))


@pytest.mark.parametrize("c", [1.0, 3.0])
def test_unbiased_and_error_estimate_covers(c):
    M = power_law_matrix(FIG4_DIM, c=c)
    estimates, errors = fig4_trials("xdiag", c, 30, seed=0)
    truth = torch.diagonal(M)
    assert_unbiased_entrywise(estimates, truth)
    # entrywise 2 * error intervals (NOTE [estimator error bars]); tests/linalg/estimators/
    # test_error_bars.py checks >= 0.93 at 12 products
    assert ((estimates - truth).abs() <= 2 * errors).double().mean() >= 0.93


@pytest.mark.parametrize("c, factor", [(2.0, 10.0), (3.0, 100.0)])
def test_beats_hutchinson_diag_on_fast_spectral_decay(c, factor):
    M = power_law_matrix(FIG4_DIM, c=c)
    hutch, _ = fig4_trials("hutchinson_diag", c, 30, seed=1)
    xd, _ = fig4_trials("xdiag", c, 30, seed=0)
    assert relative_diag_errors(xd, M).median() * factor < relative_diag_errors(hutch, M).median()


def test_non_symmetric_operator_unbiased_with_adjoint_products():
    M = torch.randn(30, 30, generator=generator(2), dtype=DTYPE)
    A = counting(M)
    xdiag(A, 10, generator=generator(3))
    assert A.num_calls == 2 and A.num_columns == 10  # A @ Omega and A^T @ Q
    estimates, _ = estimator_trials(xdiag, M, 10, 200, seed=4)
    assert_unbiased_entrywise(estimates, torch.diagonal(M))


def test_adaptive_growth_reuses_products():
    M, A, est, err = adaptive_run(
        xdiag, 100, 2.0, 8, seed=4, target_rel_error=1e-3, max_matvecs=200
    )
    assert err.max() / est.abs().max() <= 1e-3
    assert 8 < A.num_columns < 200 and A.num_columns % 8 == 0
    assert relative_diag_errors(est, M) < 5e-3


def test_bad_inputs_raise():
    M = torch.eye(6, dtype=DTYPE)
    with pytest.raises(ValueError, match="xdiag needs num_matvecs divisible by 2"):
        xdiag(M, 7)
    with pytest.raises(ValueError, match="xdiag needs num_matvecs >= 4"):
        xdiag(M, 2)
    with pytest.raises(ValueError, match="cannot exceed the dimension 6"):
        xdiag(M, 14)
    with pytest.raises(ValueError, match="requires a square operator"):
        xdiag(torch.ones(6, 5, dtype=DTYPE), 4)


def test_growing_sketch_of_low_rank_operator_stays_exact():
    """The grown sketch lies in the old range (exact zeros); Q must stay orthonormal."""
    d = torch.zeros(20, dtype=DTYPE)
    d[:2] = torch.tensor([1.0, 2.0], dtype=DTYPE)
    est = xdiag(torch.diag(d), 8, generator=generator(5), target_rel_error=1e-30, max_matvecs=24)
    torch.testing.assert_close(est, d, rtol=1e-12, atol=1e-12)
