"""Tests of ``curvops.linalg.inverses.cg``."""

import pytest
import torch
from helpers.linalg_problems import (
    DTYPE,
    counting,
    generator,
    random_indefinite,
    random_spd,
)

from curvops.linalg import CGInverseLinearOperator
from curvops.structured import TensorLinearOperator
from curvops.testing import assert_operator_matches


def test_matches_dense_inverse_all_entry_points():
    M = random_spd(30, seed=0)
    shapes = [(2, 3), (4,), (20,)]
    A = TensorLinearOperator(M, shapes, shapes)
    A_inv = CGInverseLinearOperator(A, tolerance=1e-12)
    assert A_inv.is_self_adjoint
    assert A_inv.in_shapes == shapes and A_inv.out_shapes == shapes
    assert_operator_matches(A_inv, torch.linalg.inv(M), rtol=1e-8, atol=1e-10)


def test_accepts_dense_tensor():
    M = random_spd(20, seed=1)
    b = torch.randn(20, generator=generator(0), dtype=DTYPE)
    x = CGInverseLinearOperator(M, tolerance=1e-12) @ b
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-9, atol=1e-11)


def test_columns_converge_independently_and_are_frozen():
    M = random_spd(40, seed=2, cond=1e3)
    A = counting(M)
    B = torch.randn(40, 4, generator=generator(1), dtype=DTYPE)
    # an eigenvector converges in one step; a zero column needs no step at all
    B[:, 0] = torch.linalg.eigh(M).eigenvectors[:, 3]
    B[:, 1] = 0.0
    A_inv = CGInverseLinearOperator(A, tolerance=1e-10)
    X = A_inv @ B
    torch.testing.assert_close(X, torch.linalg.solve(M, B), rtol=1e-7, atol=1e-10)
    info = A_inv.last_info
    assert info.converged.all()
    assert info.iterations[0] == 1 and info.iterations[1] == 0
    assert (info.iterations[2:] > 5).all()
    assert (info.relative_residuals <= 1e-10).all()
    # frozen columns are not multiplied any more
    assert info.num_matvecs == int(info.iterations.sum()) == A.num_columns
    assert A.num_calls == int(info.iterations.max())


def test_preconditioner_reduces_iterations():
    M = random_spd(50, seed=3, cond=1e4)
    B = torch.randn(50, 2, generator=generator(2), dtype=DTYPE)
    plain = CGInverseLinearOperator(M, tolerance=1e-10)
    X_plain = plain @ B
    # an approximate inverse (inverse of a perturbed matrix), given as a linear operator
    E = torch.randn(50, 50, generator=generator(3), dtype=DTYPE)
    approx_inv = torch.linalg.inv(M + 0.05 * (E @ E.T) / 50 * M.diagonal().mean())
    P = TensorLinearOperator(0.5 * (approx_inv + approx_inv.T))
    pcg = CGInverseLinearOperator(M, tolerance=1e-10, preconditioner=P)
    X_pcg = pcg @ B
    torch.testing.assert_close(X_pcg, torch.linalg.solve(M, B), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(X_pcg, X_plain, rtol=1e-6, atol=1e-9)
    assert pcg.last_info.iterations.max() < plain.last_info.iterations.max() / 3


def test_indefinite_operator_raises():
    M = random_indefinite(30, seed=4)
    b = torch.randn(30, generator=generator(4), dtype=DTYPE)
    with pytest.raises(ValueError, match="not positive definite.*damping.*LSMR"):
        CGInverseLinearOperator(M) @ b


def test_not_positive_definite_preconditioner_raises():
    M = random_spd(10, seed=5)
    P = -torch.eye(10, dtype=DTYPE)
    b = torch.ones(10, dtype=DTYPE)
    with pytest.raises(ValueError, match="preconditioner is not positive definite"):
        CGInverseLinearOperator(M, preconditioner=P) @ b


def test_not_converged_warns_and_reports():
    M = random_spd(30, seed=6, cond=1e4)
    b = torch.randn(30, generator=generator(5), dtype=DTYPE)
    A_inv = CGInverseLinearOperator(M, max_iter=3)
    with pytest.warns(RuntimeWarning, match="did not converge for 1 of 1"):
        A_inv @ b
    assert not A_inv.last_info.converged.any()
    assert A_inv.last_info.iterations.tolist() == [3]


def test_bad_inputs_raise():
    M = random_spd(6, seed=7)
    with pytest.raises(ValueError, match="requires a symmetric operator.*LSMR"):
        CGInverseLinearOperator(M + torch.triu(torch.ones(6, 6, dtype=DTYPE), 1))
    with pytest.raises(ValueError, match="requires a square operator"):
        CGInverseLinearOperator(torch.ones(3, 4, dtype=DTYPE))
    with pytest.raises(TypeError, match="LinearOperator or a dense torch.Tensor"):
        CGInverseLinearOperator(M.numpy())
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0"):
        CGInverseLinearOperator(M, tolerance=0.0)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        CGInverseLinearOperator(M, max_iter=0)
    with pytest.raises(ValueError, match="preconditioner has shape"):
        CGInverseLinearOperator(M, preconditioner=torch.eye(5, dtype=DTYPE))
    with pytest.raises(ValueError, match="preconditioner has dtype/device"):
        CGInverseLinearOperator(M, preconditioner=torch.eye(6, dtype=torch.float32))
    with pytest.raises(ValueError, match="preconditioner of CGInverseLinearOperator requires"):
        CGInverseLinearOperator(M, preconditioner=torch.triu(torch.ones(6, 6, dtype=DTYPE)))


def test_progressbar_runs(capsys):
    M = random_spd(8, seed=8)
    x = CGInverseLinearOperator(M, tolerance=1e-12, progressbar=True) @ torch.ones(8, dtype=DTYPE)
    torch.testing.assert_close(x, torch.linalg.solve(M, torch.ones(8, dtype=DTYPE)))
    assert "CG" in capsys.readouterr().err


def test_kronecker_inverse_preconditioner():
    """A KFAC-style preconditioner: the damped inverse of a Kronecker approximation."""
    from curvops.structured.kronecker import KroneckerProductLinearOperator

    F1, F2 = random_spd(6, seed=10, cond=50.0), random_spd(7, seed=11, cond=50.0)
    K = KroneckerProductLinearOperator(F1, F2, symmetric=True, psd=True)
    E = torch.randn(42, 42, generator=generator(12), dtype=DTYPE)
    damping = 0.1
    M = K.to_dense() + 0.05 * (E @ E.T) / 42 + damping * torch.eye(42, dtype=DTYPE)
    B = torch.randn(42, 3, generator=generator(13), dtype=DTYPE)
    plain = CGInverseLinearOperator(M, tolerance=1e-10)
    pcg = CGInverseLinearOperator(M, tolerance=1e-10, preconditioner=K.inverse(damping))
    torch.testing.assert_close(pcg @ B, torch.linalg.solve(M, B), rtol=1e-7, atol=1e-10)
    plain @ B
    assert pcg.last_info.iterations.max() < plain.last_info.iterations.max() / 5  # 6 vs 75
