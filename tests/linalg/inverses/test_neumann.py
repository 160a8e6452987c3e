"""Tests of ``curvops.linalg.inverses.neumann``."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, generator, matrix_with_spectrum

from curvops.linalg import NeumannInverseLinearOperator
from curvops.structured import TensorLinearOperator
from curvops.testing import assert_operator_matches


def _dense_partial_sum(M, num_terms, scale, P=None):
    """scale * sum_{k<N} (I - scale P M)^k P, by explicit dense matrix powers."""
    D = M.shape[0]
    P = torch.eye(D, dtype=DTYPE) if P is None else P
    step = torch.eye(D, dtype=DTYPE) - scale * P @ M
    total, power = torch.zeros(D, D, dtype=DTYPE), torch.eye(D, dtype=DTYPE)
    for _ in range(num_terms):
        total = total + power
        power = power @ step
    return scale * total @ P


def test_converged_series_is_the_inverse():
    M = matrix_with_spectrum(torch.linspace(0.2, 1.5, 25, dtype=DTYPE), seed=0)
    shapes = [(5,), (4, 5)]
    A = TensorLinearOperator(M, shapes, shapes)
    A_inv = NeumannInverseLinearOperator(A, num_terms=300, scale=1.0)
    assert A_inv.is_self_adjoint
    assert_operator_matches(A_inv, torch.linalg.inv(M), rtol=1e-9, atol=1e-10)
    assert A_inv.last_info.last_term_norms.max() < 1e-20
    assert A_inv.last_info.num_matvecs == 299 * 1


@pytest.mark.parametrize("with_preconditioner", [False, True])
def test_truncated_series_matches_dense_formula(with_preconditioner):
    M = matrix_with_spectrum(torch.linspace(0.5, 3.0, 12, dtype=DTYPE), seed=1)
    P = None
    if with_preconditioner:
        P = torch.diag(1.0 / M.diagonal())
    A_inv = NeumannInverseLinearOperator(M, num_terms=7, scale=0.4, preconditioner=P)
    assert_operator_matches(A_inv, _dense_partial_sum(M, 7, 0.4, P), rtol=1e-10, atol=1e-12)


def test_non_symmetric_operator_and_adjoint():
    g = generator(2)
    M = torch.eye(10, dtype=DTYPE) + 0.05 * torch.randn(10, 10, generator=g, dtype=DTYPE)
    P = torch.diag(1.0 + 0.1 * torch.rand(10, generator=g, dtype=DTYPE))
    A_inv = NeumannInverseLinearOperator(M, num_terms=9, scale=0.8, preconditioner=P)
    assert not A_inv.is_self_adjoint
    assert_operator_matches(A_inv, _dense_partial_sum(M, 9, 0.8, P), rtol=1e-10, atol=1e-12)


def test_preconditioner_accelerates_convergence():
    lam = torch.logspace(-2, 0, 30, dtype=DTYPE)
    M = matrix_with_spectrum(lam, seed=3)
    b = torch.randn(30, generator=generator(3), dtype=DTYPE)
    exact = torch.linalg.solve(M, b)
    P = TensorLinearOperator(torch.linalg.inv(M + 1e-2 * torch.eye(30, dtype=DTYPE)))
    plain = NeumannInverseLinearOperator(M, num_terms=50, scale=1.0) @ b
    pre = NeumannInverseLinearOperator(M, num_terms=50, scale=1.0, preconditioner=P) @ b
    err_plain = (plain - exact).norm() / exact.norm()
    err_pre = (pre - exact).norm() / exact.norm()
    assert err_pre < 1e-8 < 0.1 < err_plain


@pytest.mark.parametrize("with_preconditioner", [False, True])
def test_too_large_scale_raises(with_preconditioner):
    M = matrix_with_spectrum(torch.linspace(0.1, 4.0, 20, dtype=DTYPE), seed=4)
    P = torch.eye(20, dtype=DTYPE) * 1.1 if with_preconditioner else None
    b = torch.randn(20, generator=generator(4), dtype=DTYPE)
    # scale * lambda_max = 2.08 > 2: only the top eigen-direction diverges, slowly
    A_inv = NeumannInverseLinearOperator(M, num_terms=300, scale=0.52, preconditioner=P)
    with pytest.raises(ValueError, match="series diverges.*lower `scale`.*below 2 / lambda_max"):
        A_inv @ b


def test_safe_scale_does_not_raise():
    M = matrix_with_spectrum(torch.linspace(0.1, 4.0, 20, dtype=DTYPE), seed=4)
    b = torch.randn(20, generator=generator(4), dtype=DTYPE)
    x = NeumannInverseLinearOperator(M, num_terms=800, scale=0.45) @ b
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-10)


def test_negative_eigenvalue_raises():
    lam = torch.linspace(0.5, 1.0, 15, dtype=DTYPE)
    lam[0] = -0.1
    M = matrix_with_spectrum(lam, seed=5)
    b = torch.randn(15, generator=generator(5), dtype=DTYPE)
    with pytest.raises(ValueError, match="series diverges.*positive definite"):
        NeumannInverseLinearOperator(M, num_terms=200) @ b


def test_not_positive_definite_preconditioner_raises():
    M = matrix_with_spectrum(torch.linspace(0.5, 1.0, 6, dtype=DTYPE), seed=6)
    P = -torch.eye(6, dtype=DTYPE)
    with pytest.raises(ValueError, match="preconditioner.*not positive definite"):
        NeumannInverseLinearOperator(M, preconditioner=P) @ torch.ones(6, dtype=DTYPE)


def test_bad_inputs_raise():
    M = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="num_terms must be an integer >= 1"):
        NeumannInverseLinearOperator(M, num_terms=0)
    with pytest.raises(TypeError, match="num_terms must be an integer"):
        NeumannInverseLinearOperator(M, num_terms=2.5)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        NeumannInverseLinearOperator(M, scale=-1.0)
    with pytest.raises(ValueError, match="requires a square operator"):
        NeumannInverseLinearOperator(torch.ones(2, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="preconditioner has shape"):
        NeumannInverseLinearOperator(M, preconditioner=torch.eye(3, dtype=DTYPE))


def test_progressbar_runs(capsys):
    M = matrix_with_spectrum(torch.linspace(0.5, 1.0, 6, dtype=DTYPE), seed=7)
    NeumannInverseLinearOperator(M, num_terms=5, progressbar=True) @ torch.ones(6, dtype=DTYPE)
    assert "Neumann" in capsys.readouterr().err
