"""Tests of ``curvops.linalg.inverses.lsmr``."""

import warnings

import pytest
import torch
from helpers.linalg_problems import (
    DTYPE,
    counting,
    generator,
    matrix_with_spectrum,
    random_indefinite,
)
from torch import Tensor

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


# ------------------------------------------------------------------ right preconditioning
def _damped_ggn_problem(damping: float):
    """Damped GGN of softmax regression on unnormalised features (ill-conditioned), and KFAC.

    The input factor of KFAC captures the feature scales, so its damped inverse is a good
    preconditioner (the condition number of A P is ~7 against ~2,000 for A).
    """
    from torch import nn

    from curvops.kronecker import KFACLinearOperator
    from curvops.testing import dense_ggn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(10, 5).to(DTYPE)
    g = generator(20)
    scales = torch.logspace(-0.5, 0.5, 10, dtype=DTYPE)
    data = [
        (
            torch.randn(n, 10, generator=g, dtype=DTYPE) * scales,
            torch.randint(0, 5, (n,), generator=g),
        )
        for n in (30, 30)
    ]
    loss, params = nn.CrossEntropyLoss(), list(model.parameters())
    G = dense_ggn(model, loss, params, data)
    M = G + damping * torch.eye(G.shape[0], dtype=DTYPE)
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    return M, K


def _badly_scaled_columns(D: int, seed: int) -> Tensor:
    """C S with a well-conditioned C and column scales S spanning four orders of magnitude."""
    C = torch.eye(D, dtype=DTYPE) * 3 + _randn(D, D, seed=seed) / D**0.5
    return C @ torch.diag(torch.logspace(-2, 2, D, dtype=DTYPE))


def test_kfac_preconditioner_same_solution_fewer_iterations():
    """On an ill-conditioned damped GGN the damped KFAC inverse cuts LSMR's iterations."""
    from curvops.kronecker import KFACInverseLinearOperator

    damping = 1e-3
    M, K = _damped_ggn_problem(damping)
    P = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
    B = _randn(M.shape[0], 2, seed=21)
    plain = LSMRInverseLinearOperator(M, tolerance=1e-10)
    pre = LSMRInverseLinearOperator(M, tolerance=1e-10, preconditioner=P)
    assert pre.preconditioner is P and plain.preconditioner is None
    X_plain, X_pre = plain @ B, pre @ B
    exact = torch.linalg.solve(M, B)
    # norm-wise: cond(M) ~ 2e3 amplifies the residual tolerance in single entries
    for X in (X_plain, X_pre):
        assert (X - exact).norm() <= 1e-6 * exact.norm(), (X - exact).norm() / exact.norm()
    assert plain.last_info.converged.all() and pre.last_info.converged.all()
    few, many = pre.last_info.iterations.max(), plain.last_info.iterations.max()
    assert few < many / 3, (few, many)  # measured 40 vs 135


def test_diagonal_preconditioner_same_solution_fewer_iterations():
    """Diagonal right preconditioning by the inverse column norms undoes a bad column scaling.

    (A symmetric matrix S C S is scaled on both sides, which a right preconditioner alone
    does not undo; column scaling is the diagonal preconditioner of least squares.)
    """
    from curvops.structured import DiagonalLinearOperator

    M = _badly_scaled_columns(40, seed=30)
    P = DiagonalLinearOperator([1.0 / M.norm(dim=0)])
    B = _randn(40, 2, seed=31)
    plain = LSMRInverseLinearOperator(M, tolerance=1e-12, max_iter=2000)
    pre = LSMRInverseLinearOperator(M, tolerance=1e-12, preconditioner=P)
    exact = torch.linalg.solve(M, B)
    torch.testing.assert_close(plain @ B, exact, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pre @ B, exact, rtol=1e-6, atol=1e-8)
    few, many = pre.last_info.iterations.max(), plain.last_info.iterations.max()
    assert few < many / 3, (few, many)


def test_preconditioned_all_entry_points_and_adjoint():
    """A non-symmetric system with a non-symmetric preconditioner, through every entry point."""
    M = torch.eye(20, dtype=DTYPE) * 3 + _randn(20, 20, seed=22)
    P = torch.linalg.inv(M + 0.3 * _randn(20, 20, seed=23))
    A = TensorLinearOperator(M, [(4, 5)], [(2,), (18,)])
    A_inv = LSMRInverseLinearOperator(A, tolerance=1e-13, preconditioner=P)
    assert not A_inv.is_self_adjoint
    assert_operator_matches(A_inv, torch.linalg.inv(M), rtol=1e-7, atol=1e-9)


def test_preconditioned_counts_products_with_the_operator_only():
    M = torch.eye(20, dtype=DTYPE) * 3 + _randn(20, 20, seed=32)
    A, P = counting(M), counting(torch.linalg.inv(M + 0.3 * _randn(20, 20, seed=33)))
    A_inv = LSMRInverseLinearOperator(A, tolerance=1e-12, preconditioner=P)
    X = A_inv @ _randn(20, 3, seed=34)
    torch.testing.assert_close(M @ X, _randn(20, 3, seed=34), rtol=1e-7, atol=1e-8)
    info = A_inv.last_info
    assert info.num_matvecs == A.num_columns == 3 + 2 * int(info.iterations.sum())
    # P and P^T once per product with A^T and A, and once more to map y to x
    assert P.num_columns == A.num_columns + 3


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)], ids=["tall", "wide"])
def test_preconditioned_rectangular(shape):
    """Tall full-rank: the unique least-squares solution; wide: a solution of A x = b."""
    M = _randn(*shape, seed=24)
    pinv = torch.linalg.pinv(M)
    P = pinv + 0.05 * _randn(shape[1], shape[0], seed=25)  # an approximate pseudo-inverse
    A_pinv = LSMRInverseLinearOperator(M, tolerance=1e-13, preconditioner=P)
    B = _randn(shape[0], 3, seed=26)
    X = A_pinv @ B
    if shape[0] > shape[1]:
        torch.testing.assert_close(X, pinv @ B, rtol=1e-7, atol=1e-9)
    else:  # compatible, but x = P y is not the minimum-norm solution
        torch.testing.assert_close(M @ X, B, rtol=1e-8, atol=1e-9)
        assert (X - pinv @ B).norm() > 1e-3 * X.norm()


def test_preconditioned_singular_square_warns():
    """An incompatible singular square system: a least-squares solution, and a warning."""
    M = matrix_with_spectrum(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=DTYPE), seed=27)
    b = _randn(6, seed=28)
    P = torch.diag(torch.linspace(0.5, 2.0, 6, dtype=DTYPE))
    A_inv = LSMRInverseLinearOperator(M, tolerance=1e-12, preconditioner=P)
    with pytest.warns(RuntimeWarning, match="singular to the tolerance.*not the minimum-norm"):
        x = A_inv @ b
    pinv_b = torch.linalg.pinv(M) @ b
    torch.testing.assert_close(M @ x, M @ pinv_b, rtol=1e-8, atol=1e-9)  # least squares
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a preconditioner: x = A^+ b
        x_plain = LSMRInverseLinearOperator(M, tolerance=1e-12) @ b
    torch.testing.assert_close(x_plain, pinv_b, rtol=1e-8, atol=1e-9)


def test_bad_preconditioner_raises():
    M = _randn(8, 5, seed=29)
    with pytest.raises(ValueError, match=r"preconditioner has shape \(5, 5\).*requires shape"):
        LSMRInverseLinearOperator(M, preconditioner=torch.eye(5, dtype=DTYPE))
    with pytest.raises(ValueError, match="preconditioner has dtype/device"):
        LSMRInverseLinearOperator(M, preconditioner=torch.zeros(5, 8, dtype=torch.float32))
    with pytest.raises(TypeError, match="preconditioner must be a curvops.LinearOperator"):
        LSMRInverseLinearOperator(M, preconditioner=[[1.0]])
