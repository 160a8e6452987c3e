"""Tests of ``curvops.linalg.sketches.nystrom``."""

import pytest
import torch
from helpers.linalg_problems import (
    DTYPE,
    counting,
    generator,
    matrix_with_spectrum,
    power_law_matrix,
    random_indefinite,
)

from curvops.linalg import nystrom_approximation
from curvops.structured import EigendecompositionLinearOperator, TensorLinearOperator
from curvops.testing import assert_operator_matches


def _best_rank_k_error(M, k):
    """Frobenius error of the best rank-k approximation (Eckart-Young)."""
    lam = torch.linalg.eigvalsh(M)
    return lam.abs().sort().values[:-k].square().sum().sqrt()


def test_exact_for_low_rank_psd_operator_with_tensor_shapes():
    U = torch.randn(60, 5, generator=generator(0), dtype=DTYPE)
    M = U @ U.T
    shapes = [(3, 4), (48,)]
    A = counting(M, in_shapes=shapes, out_shapes=shapes)
    approx = nystrom_approximation(A, 5, oversampling=3, generator=generator(1))
    assert isinstance(approx, EigendecompositionLinearOperator)
    assert approx.in_shapes == shapes and approx.is_psd
    assert (A.num_calls, A.num_columns) == (1, 8)  # one block product
    assert_operator_matches(approx, M, rtol=1e-8, atol=1e-10)
    lam = approx.eigenvalues
    assert (lam[1:] >= lam[:-1]).all()  # ascending
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(M)[-5:], rtol=1e-10, atol=1e-10)


def test_near_optimal_on_decaying_spectrum():
    M = power_law_matrix(200, c=2.0)
    approx = nystrom_approximation(M, 10, oversampling=10, generator=generator(2))
    error = torch.linalg.matrix_norm(M - approx.to_dense())
    assert error < 2.0 * _best_rank_k_error(M, 10)
    torch.testing.assert_close(
        approx.eigenvectors.T @ approx.eigenvectors, torch.eye(10, dtype=DTYPE)
    )


def test_zero_operator_gives_zero_approximation():
    approx = nystrom_approximation(torch.zeros(10, 10, dtype=DTYPE), 3, generator=generator(3))
    assert (approx.to_dense() == 0).all()


def test_sketch_size_is_capped_at_the_dimension():
    M = matrix_with_spectrum(torch.linspace(0.1, 1.0, 12, dtype=DTYPE), seed=4)
    A = counting(M)
    approx = nystrom_approximation(A, 12, oversampling=10, generator=generator(5))
    assert A.num_columns == 12
    torch.testing.assert_close(approx.to_dense(), M, rtol=1e-10, atol=1e-10)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positive semi-definite.*randomized_eigh"):
        nystrom_approximation(random_indefinite(30, seed=6), 3, generator=generator(7))
    M = torch.eye(5, dtype=DTYPE)
    with pytest.raises(ValueError, match="rank must be at most the dimension D=5"):
        nystrom_approximation(M, 6)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        nystrom_approximation(M, 0)
    with pytest.raises(ValueError, match="oversampling must be an integer >= 0"):
        nystrom_approximation(M, 2, oversampling=-1)
    with pytest.raises(ValueError, match="requires a symmetric operator"):
        nystrom_approximation(TensorLinearOperator(torch.triu(torch.ones(5, 5, dtype=DTYPE))), 2)
