"""Tests of ``curvops.linalg.estimators.xtrace`` (and its leave-one-out sketch)."""

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
    FIG4_RUNS,
    counting,
    estimator_trials,
    fig4_trials,
    generator,
    power_law_matrix,
    relative_trace_errors,
)

from curvops.linalg import BudgetExhaustedWarning, xtrace
from curvops.linalg.estimators._exchangeable_sketch import LeaveOneOutSketch
from curvops.linalg.estimators.xtrace import _xtrace_samples
from curvops.structured import TensorLinearOperator


@pytest.mark.parametrize("growth", [[6], [2, 4], [3, 1, 2]])
def test_leave_one_out_estimates_match_explicit_formula(growth):
    """Each t_i against its definition with an explicit QR of A Omega_{-i} (non-symmetric A)."""
    M, Omega, sketch = grown_leave_one_out_sketch(25, growth, transpose_products=False)
    expected = [
        torch.trace(Q_i.T @ M @ Q_i) + w @ P @ M @ P @ w
        for Q_i, P, w in explicit_leave_one_out(M, Omega)
    ]
    torch.testing.assert_close(_xtrace_samples(sketch)[0], torch.stack(expected))
    assert sketch.num_matvecs == 2 * sum(growth)


@pytest.mark.parametrize("growth", [[6], [2, 4]])
def test_rescaled_estimates_match_explicit_formula(growth):
    """NOTE [XTrace normalization]: the deflated vector rescaled to squared norm D - m + 1."""
    M, Omega, sketch = grown_leave_one_out_sketch(25, growth, transpose_products=False)
    D, m = Omega.shape
    expected = [
        torch.trace(Q_i.T @ M @ Q_i) + (D - m + 1) / (P @ w).square().sum() * (w @ P @ M @ P @ w)
        for Q_i, P, w in explicit_leave_one_out(M, Omega)
    ]
    torch.testing.assert_close(_xtrace_samples(sketch, rescale=True)[0], torch.stack(expected))


@pytest.mark.parametrize("distribution", ["sphere", "normal", "rademacher"])
def test_unbiased_for_every_distribution(distribution):
    M = power_law_matrix(50, c=0.5, seed=2)
    estimates, _ = estimator_trials(xtrace, M, 12, 400, seed=3, distribution=distribution)
    truth = torch.trace(M)
    assert (estimates.mean() - truth).abs() <= 4 * estimates.std() / 400**0.5


def test_sphere_vectors_have_norm_sqrt_dim():
    from curvops.linalg._sampling import Distribution, random_test_matrix

    V = random_test_matrix(50, 7, Distribution.SPHERE, generator(0), DTYPE, torch.device("cpu"))
    torch.testing.assert_close(V.square().sum(0), torch.full((7,), 50.0, dtype=DTYPE))


@pytest.mark.parametrize("c", [1.0, 3.0])
def test_unbiased_and_error_estimate_covers(c):
    M = power_law_matrix(FIG4_DIM, c=c)
    estimates, errors = fig4_trials("xtrace", c, 30, seed=0)
    truth = torch.trace(M)
    assert (estimates.mean() - truth).abs() <= 4 * estimates.std() / FIG4_RUNS**0.5
    # NOTE [XTrace error]: the larger of two estimates, Student-t widened
    assert ((estimates - truth).abs() <= 2 * errors).double().mean() >= 0.93


@pytest.mark.parametrize("c", [2.0, 3.0])
def test_beats_hutchinson_and_hutchpp_on_fast_spectral_decay(c):
    M = power_law_matrix(FIG4_DIM, c=c)
    hutch, _ = fig4_trials("hutchinson_trace", c, 30, seed=1)
    hpp, _ = fig4_trials("hutchpp_trace", c, 30, seed=0)
    xt, _ = fig4_trials("xtrace", c, 30, seed=0)
    median = {k: relative_trace_errors(v, M).median() for k, v in [("h", hutch), ("p", hpp)]}
    median_xt = relative_trace_errors(xt, M).median()
    assert median_xt * 10 < median["h"] and median_xt < median["p"]


def test_exact_for_low_rank_operator():
    U = torch.randn(40, 3, generator=generator(4), dtype=DTYPE)
    est, err = xtrace(U @ U.T, 10, generator=generator(5), return_error=True)
    torch.testing.assert_close(est, (U * U).sum(), rtol=1e-9, atol=1e-9)
    assert err < 1e-8


def test_adaptive_growth_reuses_products():
    M, A, est, err = adaptive_run(
        xtrace, 120, 1.0, 10, seed=6, target_rel_error=3e-3, max_matvecs=240
    )
    assert err / est.abs() <= 3e-3
    assert 10 < A.num_columns < 240 and A.num_columns % 10 == 0
    assert (est - torch.trace(M)).abs() / torch.trace(M) < 1e-2
    B = counting(M)
    with pytest.warns(BudgetExhaustedWarning):
        xtrace(B, 10, generator=generator(6), target_rel_error=1e-12, max_matvecs=36)
    assert B.num_columns == 36


def test_bad_inputs_raise():
    M = torch.eye(6, dtype=DTYPE)
    with pytest.raises(ValueError, match="xtrace needs num_matvecs divisible by 2"):
        xtrace(M, 5)
    with pytest.raises(ValueError, match="xtrace needs num_matvecs >= 4"):
        xtrace(M, 2)
    with pytest.raises(ValueError, match="num_matvecs <= 12.*cannot exceed the dimension 6"):
        xtrace(M, 14)
    with pytest.raises(ValueError, match="requires a square operator"):
        xtrace(torch.ones(6, 4, dtype=DTYPE), 4)
    with pytest.raises(ValueError, match="Unknown distribution"):
        xtrace(M, 4, distribution="uniform")


def test_growing_sketch_keeps_an_orthonormal_basis():
    d = torch.zeros(20, dtype=DTYPE)
    d[:2] = torch.tensor([1.0, 2.0], dtype=DTYPE)
    sketch = LeaveOneOutSketch(TensorLinearOperator(torch.diag(d)), transpose_products=False)
    g = generator(7)
    for _ in range(2):  # Rademacher sketches of a diagonal matrix: exact zeros after deflation
        sketch.grow(torch.randint(0, 2, (20, 4), generator=g).to(DTYPE) * 2 - 1)
    torch.testing.assert_close(sketch.Q.T @ sketch.Q, torch.eye(8, dtype=DTYPE))
    torch.testing.assert_close(sketch.Q @ sketch.R, sketch.Y)
    samples, _ = _xtrace_samples(sketch)
    torch.testing.assert_close(samples, torch.full((8,), 3.0, dtype=DTYPE))
