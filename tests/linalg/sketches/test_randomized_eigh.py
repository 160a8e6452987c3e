"""Tests of ``curvops.linalg.sketches.randomized_eigh``."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, generator, matrix_with_spectrum

from curvops.linalg import randomized_eigh
from curvops.testing import assert_operator_matches


def test_exact_for_low_rank_indefinite_operator():
    lam = torch.zeros(50, dtype=DTYPE)
    lam[:4] = torch.tensor([-5.0, -1.0, 2.0, 7.0], dtype=DTYPE)
    M = matrix_with_spectrum(lam, seed=0)
    shapes = [(5, 10)]
    A = counting(M, in_shapes=shapes, out_shapes=shapes)
    approx = randomized_eigh(A, 4, oversampling=4, num_power_iterations=1, generator=generator(1))
    assert approx.in_shapes == shapes
    # (q + 2) block products with k + p columns each
    assert (A.num_calls, A.num_columns) == (3, 24)
    assert_operator_matches(approx, M, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(approx.eigenvalues, lam[:4].sort().values, rtol=1e-10, atol=1e-10)


def test_power_iterations_sharpen_the_largest_magnitude_eigenpairs():
    i = torch.arange(1, 121, dtype=DTYPE)
    lam = (-1.0) ** i * i ** (-1.5)  # alternating signs, power-law magnitudes
    M = matrix_with_spectrum(lam, seed=2)
    expected = lam[:5].sort().values
    best = lam[5:].square().sum().sqrt()  # Eckart-Young: best rank-5 Frobenius error
    eigenvalue_errors, errors = [], []
    for q in (0, 2):
        approx = randomized_eigh(
            M, 5, oversampling=10, num_power_iterations=q, generator=generator(3)
        )
        eigenvalue_errors.append((approx.eigenvalues - expected).abs().max())
        errors.append(torch.linalg.matrix_norm(M - approx.to_dense()))
    assert eigenvalue_errors[1] < 1e-5 < eigenvalue_errors[0]
    assert best <= errors[1] < (1 + 1e-4) * best < errors[0] < 1.5 * best


def test_bad_inputs_raise():
    M = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="num_power_iterations must be an integer >= 0"):
        randomized_eigh(M, 2, num_power_iterations=-1)
    with pytest.raises(ValueError, match="randomized_eigh requires a square operator"):
        randomized_eigh(torch.ones(4, 3, dtype=DTYPE), 2)
