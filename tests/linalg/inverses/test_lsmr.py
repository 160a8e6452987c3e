"""Tests of ``curvops.linalg.inverses.lsmr``."""

import warnings

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, generator, random_indefinite

from curvops.linalg import LSMRInverseLinearOperator
from curvops.structured import TensorLinearOperator
from curvops.testing import assert_operator_matches


def _randn(*shape, seed):
    return torch.randn(*shape, generator=generator(seed), dtype=DTYPE)


def test_square_non_symmetric_inverse_all_entry_points():
    M = torch.eye(20, dtype=DTYPE) * 3 + _randn(20, 20, seed=0)
    A = TensorLinearOperator(M, [(4, 5)], [(2,), (18,)])
    A_inv = LSMRInverseLinearOperator(A, tolerance=1e-13)
    assert A_inv.in_shapes == [(2,), (18,)] and A_inv.out_shapes == [(4, 5)]
    assert not A_inv.is_self_adjoint
    assert_operator_matches(A_inv, torch.linalg.inv(M), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)], ids=["tall", "wide"])
def test_rectangular_least_squares_gives_pseudo_inverse(shape):
    M = _randn(*shape, seed=1)
    A_pinv = LSMRInverseLinearOperator(M, tolerance=1e-13)
    assert A_pinv.shape == (shape[1], shape[0])
    assert_operator_matches(A_pinv, torch.linalg.pinv(M), rtol=1e-7, atol=1e-9)


def test_symmetric_indefinite_and_dense_input():
    M = random_indefinite(25, seed=2)
    A_inv = LSMRInverseLinearOperator(M, tolerance=1e-13)
    assert A_inv.is_self_adjoint
    B = _randn(25, 3, seed=3)
    torch.testing.assert_close(A_inv @ B, torch.linalg.solve(M, B), rtol=1e-8, atol=1e-10)


def test_residual_recurrences_match_true_residuals():
    M = _randn(40, 25, seed=4)
    B = _randn(40, 3, seed=5)
    for max_iter in (1, 2, 7, 15):
        A_pinv = LSMRInverseLinearOperator(M, tolerance=1e-14, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            X = A_pinv @ B
        R = B - M @ X
        info = A_pinv.last_info
        torch.testing.assert_close(info.residual_norms, R.norm(dim=0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            info.normal_residual_norms, (M.T @ R).norm(dim=0), rtol=1e-7, atol=1e-10
        )


def test_columns_stop_independently():
    M = torch.eye(30, dtype=DTYPE) * 2 + 0.3 * _randn(30, 30, seed=6)
    A = counting(M)
    B = _randn(30, 3, seed=7)
    B[:, 1] = 0.0
    A_inv = LSMRInverseLinearOperator(A, tolerance=1e-12)
    X = A_inv @ B
    torch.testing.assert_close(X, torch.linalg.solve(M, B), rtol=1e-8, atol=1e-10)
    info = A_inv.last_info
    assert info.converged.all() and info.iterations[1] == 0 and (X[:, 1] == 0).all()
    assert info.num_matvecs == A.num_columns == 3 + 2 * int(info.iterations.sum())


def test_not_converged_warns():
    M = _randn(30, 30, seed=8)
    A_inv = LSMRInverseLinearOperator(M, max_iter=2)
    with pytest.warns(RuntimeWarning, match="LSMRInverseLinearOperator did not converge"):
        A_inv @ torch.ones(30, dtype=DTYPE)
    assert A_inv.last_info.iterations.tolist() == [2]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0"):
        LSMRInverseLinearOperator(torch.eye(3, dtype=DTYPE), tolerance=-1.0)
    with pytest.raises(TypeError, match="max_iter must be an integer"):
        LSMRInverseLinearOperator(torch.eye(3, dtype=DTYPE), max_iter=1.5)
    with pytest.raises(TypeError, match="LinearOperator or a dense torch.Tensor"):
        LSMRInverseLinearOperator([[1.0]])


def test_progressbar_runs(capsys):
    M = torch.eye(5, dtype=DTYPE) * 2
    x = LSMRInverseLinearOperator(M, progressbar=True) @ torch.ones(5, dtype=DTYPE)
    torch.testing.assert_close(x, torch.full((5,), 0.5, dtype=DTYPE))
    assert "LSMR" in capsys.readouterr().err
