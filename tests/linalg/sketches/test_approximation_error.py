"""Tests of ``curvops.linalg.sketches.approximation_error``."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, generator, power_law_matrix

from curvops.linalg import estimate_approximation_error, nystrom_approximation
from curvops.structured import TensorLinearOperator


def _problem():
    M = power_law_matrix(100, c=1.0)
    shapes = [(10, 10)]
    A = TensorLinearOperator(M, shapes, shapes)
    approx = nystrom_approximation(M, 8, generator=generator(0))  # flat shapes: [(100,)]
    E = M - approx.to_dense()
    return A, approx, E


def test_frobenius_estimate_is_unbiased_in_square():
    A, approx, E = _problem()
    g = generator(1)
    estimates = torch.stack(
        [estimate_approximation_error(A, approx, num_matvecs=10, generator=g) for _ in range(200)]
    )
    truth = torch.linalg.matrix_norm(E) ** 2
    squares = estimates**2
    assert (squares.mean() - truth).abs() <= 4 * squares.std() / 200**0.5


def test_spectral_bound_holds_and_is_not_vacuous():
    A, approx, E = _problem()
    g = generator(2)
    bounds = torch.stack(
        [
            estimate_approximation_error(A, approx, num_matvecs=5, norm="spectral", generator=g)
            for _ in range(100)
        ]
    )
    spectral = torch.linalg.matrix_norm(E, ord=2)
    assert (bounds >= spectral).all()  # fails with probability <= 100 * 1e-5
    # ||E w|| concentrates around ||E||_F, so the bound is at most ~ 10 sqrt(2/pi) 3 ||E||_F
    assert bounds.max() < 24 * torch.linalg.matrix_norm(E)


def test_one_block_product_each():
    M = power_law_matrix(30, c=1.0)
    A, B = counting(M), counting(M * 0.9)
    estimate = estimate_approximation_error(A, B, num_matvecs=7, generator=generator(3))
    assert (A.num_calls, A.num_columns, B.num_calls, B.num_columns) == (1, 7, 1, 7)
    assert 0.0 < estimate < 1.0


def test_bad_inputs_raise():
    M = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="approximation has shape"):
        estimate_approximation_error(M, torch.eye(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="but the approximation has torch.float32"):
        estimate_approximation_error(M, torch.eye(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="Unknown norm 'nuclear'"):
        estimate_approximation_error(M, M, norm="nuclear")
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 1"):
        estimate_approximation_error(M, M, num_matvecs=0)
