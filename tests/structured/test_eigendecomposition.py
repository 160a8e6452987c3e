"""Tests of ``curvops.structured.eigendecomposition``."""

import math

import pytest
import torch

from curvops.structured import EigendecompositionLinearOperator
from curvops.testing import assert_operator_matches


def _orthonormal(D, k, seed=0):
    X = torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    return Q[:, :k]


def _dense(Q, lam, c=0.0):
    D = Q.shape[0]
    P = torch.eye(D, dtype=Q.dtype) - Q @ Q.T
    return Q @ torch.diag(lam) @ Q.T + c * P


LAM_FULL = torch.tensor([3.0, 0.5, 2.0, 1.0, 4.0, 0.25], dtype=torch.float64)
LAM_LOW = torch.tensor([3.0, -0.5, 2.0], dtype=torch.float64)


def test_full_rank_entry_points_and_shapes():
    Q = _orthonormal(6, 6)
    op = EigendecompositionLinearOperator(Q, LAM_FULL, shapes=[(2,), (2, 2)])
    assert op.is_self_adjoint and op.is_psd
    assert op.in_shapes == op.out_shapes == [(2,), (2, 2)]
    assert_operator_matches(op, _dense(Q, LAM_FULL))
    assert op.eigenvectors is Q and op.eigenvalues is LAM_FULL


@pytest.mark.parametrize("c", [0.0, 0.7])
def test_low_rank_entry_points(c):
    Q = _orthonormal(6, 3, seed=1)
    op = EigendecompositionLinearOperator(Q, LAM_LOW, complement_eigenvalue=c)
    assert op.shape == (6, 6) and op.in_shapes == [(6,)]
    assert not op.is_psd  # one negative eigenvalue
    assert op.complement_eigenvalue == c
    assert_operator_matches(op, _dense(Q, LAM_LOW, c))


@pytest.mark.parametrize(
    "k, c", [(6, 0.0), (3, 0.0), (3, 0.7)], ids=["full", "low-rank", "low-rank+complement"]
)
def test_closed_forms(k, c):
    Q = _orthonormal(6, k, seed=2)
    lam = LAM_FULL[:k]
    op = EigendecompositionLinearOperator(Q, lam, complement_eigenvalue=c)
    A = _dense(Q, lam, c)
    torch.testing.assert_close(op.trace(), torch.trace(A))
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(A))
    torch.testing.assert_close(op.diagonal(), torch.diagonal(A))
    torch.testing.assert_close(op.det(), torch.linalg.det(A), atol=1e-12, rtol=1e-7)
    if k == 6 or c != 0.0:
        torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(A)[1])


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_inverse_full_rank(damping):
    Q = _orthonormal(6, 6, seed=3)
    op = EigendecompositionLinearOperator(Q, LAM_FULL)
    inv = op.inverse(damping=damping)
    assert isinstance(inv, EigendecompositionLinearOperator) and inv.is_psd
    expected = torch.linalg.inv(_dense(Q, LAM_FULL) + damping * torch.eye(6).double())
    assert_operator_matches(inv, expected)


@pytest.mark.parametrize("c", [0.0, 0.7])
def test_inverse_low_rank_damped(c):
    Q = _orthonormal(6, 3, seed=4)
    op = EigendecompositionLinearOperator(Q, LAM_LOW, complement_eigenvalue=c)
    inv = op.inverse(damping=0.3)
    expected = torch.linalg.inv(_dense(Q, LAM_LOW, c) + 0.3 * torch.eye(6).double())
    assert_operator_matches(inv, expected)
    # the formula of the brief: Q diag(1/(λ+δ)) Qᵀ + (I - QQᵀ)/δ for c = 0
    if c == 0.0:
        P = torch.eye(6).double() - Q @ Q.T
        torch.testing.assert_close(
            inv.to_dense(), Q @ torch.diag(1 / (LAM_LOW + 0.3)) @ Q.T + P / 0.3
        )


def test_logdet_with_negative_eigenvalue_pair():
    Q = _orthonormal(4, 4, seed=5)
    lam = torch.tensor([-1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    op = EigendecompositionLinearOperator(Q, lam)
    torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(_dense(Q, lam))[1])


def test_logdet_zero_eigenvalue_is_minus_inf():
    op = EigendecompositionLinearOperator(_orthonormal(3, 3), torch.zeros(3).double())
    assert op.logdet() == float("-inf")


def test_scaling_and_algebra():
    Q = _orthonormal(5, 2, seed=6)
    lam = torch.tensor([2.0, 1.0], dtype=torch.float64)
    op = EigendecompositionLinearOperator(Q, lam, complement_eigenvalue=0.5)
    A = _dense(Q, lam, 0.5)
    scaled = -3.0 * op
    assert isinstance(scaled, EigendecompositionLinearOperator)
    assert_operator_matches(scaled, -3.0 * A)
    assert_operator_matches(-op, -A)
    assert_operator_matches(op + op, 2 * A)


def test_empty_eigendecomposition_is_scaled_identity():
    Q = torch.zeros(4, 0, dtype=torch.float64)
    op = EigendecompositionLinearOperator(Q, torch.zeros(0).double(), complement_eigenvalue=2.0)
    assert_operator_matches(op, 2.0 * torch.eye(4).double())
    torch.testing.assert_close(op.logdet(), torch.tensor(4 * math.log(2.0), dtype=torch.float64))


# ------------------------------------------------------------------ errors
def test_error_shapes():
    Q = _orthonormal(5, 3)
    with pytest.raises(ValueError, match="3 eigenvectors .* but 2 eigenvalues"):
        EigendecompositionLinearOperator(Q, torch.ones(2).double())
    with pytest.raises(ValueError, match="at most D orthonormal vectors"):
        EigendecompositionLinearOperator(Q.T, torch.ones(5).double(), check_orthonormal=False)
    with pytest.raises(ValueError, match=r"shapes .* describe 4 entries, but 5"):
        EigendecompositionLinearOperator(Q, torch.ones(3).double(), shapes=[(2, 2)])
    with pytest.raises(ValueError, match="must have 1 dimension"):
        EigendecompositionLinearOperator(Q, torch.ones(3, 1).double())


def test_error_dtype_device_and_type():
    Q = _orthonormal(4, 2)
    with pytest.raises(TypeError, match="eigenvalues has dtype torch.float32, but eigenvectors"):
        EigendecompositionLinearOperator(Q, torch.ones(2))
    with pytest.raises(TypeError, match="complement_eigenvalue must be a real number"):
        EigendecompositionLinearOperator(Q, torch.ones(2).double(), complement_eigenvalue="1")
    with pytest.raises(ValueError, match="device"):
        EigendecompositionLinearOperator(Q, torch.ones(2, dtype=torch.float64, device="meta"))


def test_error_not_orthonormal():
    Q = _orthonormal(4, 2) * 2
    with pytest.raises(ValueError, match="orthonormal columns"):
        EigendecompositionLinearOperator(Q, torch.ones(2).double())
    # opt-out is honoured
    EigendecompositionLinearOperator(Q, torch.ones(2).double(), check_orthonormal=False)


def test_error_logdet_low_rank_and_negative():
    op = EigendecompositionLinearOperator(_orthonormal(4, 2), torch.ones(2).double())
    with pytest.raises(ValueError, match="singular"):
        op.logdet()
    neg = EigendecompositionLinearOperator(_orthonormal(2, 2), torch.tensor([1.0, -1.0]).double())
    with pytest.raises(ValueError, match="not positive definite"):
        neg.logdet()


def test_error_inverse_singular():
    op = EigendecompositionLinearOperator(_orthonormal(4, 2), torch.ones(2).double())
    with pytest.raises(ValueError, match="pass damping > 0"):
        op.inverse()
    zero = EigendecompositionLinearOperator(_orthonormal(2, 2), torch.tensor([1.0, 0.0]).double())
    with pytest.raises(ValueError, match="eigenvalue plus damping 0.0 is zero"):
        zero.inverse()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        zero.inverse(damping=float("nan"))
