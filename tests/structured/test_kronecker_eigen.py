"""Tests of ``curvops.structured.kronecker_eigen``."""

import pytest
import torch

from curvops.structured import KroneckerEigenLinearOperator
from curvops.testing import assert_operator_matches

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _orthogonal(n, seed=0):
    return torch.linalg.qr(_rand(n, n, seed=seed))[0]


def _dense(Qs, lam):
    """Dense ground truth from index notation: sum_j Λ_j (⊗ Q_i[:, j_i])(⊗ Q_i[:, j_i])ᵀ."""
    if len(Qs) == 2:
        Q = torch.einsum("ai,bj->abij", *Qs).reshape(lam.numel(), lam.numel())
    else:
        Q = torch.einsum("ai,bj,ck->abcijk", *Qs).reshape(lam.numel(), lam.numel())
    return Q @ torch.diag(lam.reshape(-1)) @ Q.T


CASES = {
    "2-factors": lambda: ([_orthogonal(3, 1), _orthogonal(2, 2)], _rand(3, 2, seed=3).abs()),
    "3-factors": lambda: (
        [_orthogonal(2, 4), _orthogonal(3, 5), _orthogonal(2, 6)],
        _rand(2, 3, 2, seed=7),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_entry_points(case):
    Qs, lam = CASES[case]()
    op = KroneckerEigenLinearOperator(Qs, lam)
    assert op.is_self_adjoint and op.is_psd == bool((lam >= 0).all())
    assert op.in_shapes == op.out_shapes == [tuple(lam.shape)]
    assert op.eigenvalues is lam and op.eigenvectors == tuple(Qs)
    assert_operator_matches(op, _dense(Qs, lam))


def test_single_factor_and_custom_shape():
    Q, lam = _orthogonal(6, 8), _rand(6, seed=9)
    op = KroneckerEigenLinearOperator([Q], lam, shape=(2, 3))
    assert op.in_shapes == [(2, 3)]
    assert_operator_matches(op, Q @ torch.diag(lam) @ Q.T)


@pytest.mark.parametrize("case", CASES)
def test_closed_forms(case):
    Qs, lam = CASES[case]()
    op = KroneckerEigenLinearOperator(Qs, lam)
    A = _dense(Qs, lam)
    torch.testing.assert_close(op.trace(), torch.trace(A))
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(A))
    torch.testing.assert_close(op.diagonal(), torch.diagonal(A))
    torch.testing.assert_close(op.det(), torch.linalg.det(A))
    sign, logabsdet = torch.linalg.slogdet(A)
    if sign > 0:
        torch.testing.assert_close(op.logdet(), logabsdet)
    else:
        with pytest.raises(ValueError, match="not positive definite"):
            op.logdet()


def test_logdet_zero_eigenvalue_is_minus_inf():
    lam = torch.tensor([[1.0, 0.0]], dtype=F64)
    op = KroneckerEigenLinearOperator([torch.eye(1, dtype=F64), _orthogonal(2)], lam)
    assert op.logdet() == -float("inf")


@pytest.mark.parametrize("damping", [0.0, 0.25])
@pytest.mark.parametrize("case", CASES)
def test_inverse(case, damping):
    Qs, lam = CASES[case]()
    lam = lam.abs() + 0.1
    inv = KroneckerEigenLinearOperator(Qs, lam).inverse(damping=damping)
    assert isinstance(inv, KroneckerEigenLinearOperator) and inv.is_psd
    A = _dense(Qs, lam)
    assert_operator_matches(inv, torch.linalg.inv(A + damping * torch.eye(A.shape[0]).double()))


def test_scaling_and_algebra():
    Qs, lam = CASES["2-factors"]()
    op = KroneckerEigenLinearOperator(Qs, lam)
    A = _dense(Qs, lam)
    assert isinstance(0.5 * op, KroneckerEigenLinearOperator)
    assert_operator_matches(0.5 * op, 0.5 * A)
    assert_operator_matches(-op, -A)
    assert_operator_matches(op @ op, A @ A)


# ------------------------------------------------------------------ errors
def test_error_bad_eigenvectors():
    lam = _rand(2, 2)
    with pytest.raises(TypeError, match="must be a list of matrices"):
        KroneckerEigenLinearOperator(_orthogonal(2), lam)
    with pytest.raises(ValueError, match="eigenvectors is empty"):
        KroneckerEigenLinearOperator([], lam)
    with pytest.raises(ValueError, match=r"eigenvectors\[1\] must be square"):
        KroneckerEigenLinearOperator([_orthogonal(2), _rand(2, 1)], lam)
    with pytest.raises(ValueError, match=r"eigenvectors\[0\] must have orthonormal columns"):
        KroneckerEigenLinearOperator([2 * _orthogonal(2), _orthogonal(2)], lam)


def test_error_bad_eigenvalues_and_shape():
    Qs = [_orthogonal(2), _orthogonal(3)]
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \(2, 3\)"):
        KroneckerEigenLinearOperator(Qs, _rand(6))
    with pytest.raises(ValueError, match=r"shape \(5,\) has 5 entries, but the eigenbasis has 6"):
        KroneckerEigenLinearOperator(Qs, _rand(2, 3), shape=(5,))
    with pytest.raises(TypeError, match="eigenvalues has dtype torch.float32"):
        KroneckerEigenLinearOperator(Qs, torch.ones(2, 3))
    with pytest.raises(ValueError, match="eigenvalues lives on device meta"):
        KroneckerEigenLinearOperator(Qs, torch.ones(2, 3, dtype=F64, device="meta"))


def test_error_singular_inverse_and_negative_det():
    lam = torch.tensor([[1.0, -1.0]], dtype=F64)
    op = KroneckerEigenLinearOperator([torch.eye(1, dtype=F64), _orthogonal(2)], lam)
    with pytest.raises(ValueError, match="not positive definite"):
        op.logdet()
    with pytest.raises(ValueError, match="eigenvalue plus damping 1.0 is zero"):
        op.inverse(damping=1.0)
