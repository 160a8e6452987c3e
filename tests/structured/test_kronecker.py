"""Tests of ``curvops.structured.kronecker``."""

import pytest
import torch

from curvops.structured import (
    IdentityLinearOperator,
    KroneckerEigenLinearOperator,
    KroneckerProductLinearOperator,
)
from curvops.testing import assert_operator_matches

F64 = torch.float64
LETTERS = "abcdef"


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _spd(n, seed=0):
    X = _rand(n, n, seed=seed)
    return X @ X.T / n + 0.5 * torch.eye(n, dtype=F64)


def _kron_dense(*factors):
    """Dense Kronecker product from index notation (independent of torch.kron)."""
    rows, cols = LETTERS[: len(factors)], LETTERS.upper()[: len(factors)]
    spec = ",".join(r + c for r, c in zip(rows, cols)) + "->" + rows + cols
    m = 1
    n = 1
    for A in factors:
        m, n = m * A.shape[0], n * A.shape[1]
    return torch.einsum(spec, *factors).reshape(m, n)


def test_row_major_convention():
    """NOTE [Kronecker order]: (A ⊗ B) vec_r(X) = vec_r(A X Bᵀ)."""
    A, B, X = _rand(3, 2, seed=1), _rand(4, 5, seed=2), _rand(2, 5, seed=3)
    K = KroneckerProductLinearOperator(A, B)
    assert K.in_shapes == [(2, 5)] and K.out_shapes == [(3, 4)]
    torch.testing.assert_close(K @ [X], [A @ X @ B.T])
    torch.testing.assert_close(K.to_dense(), _kron_dense(A, B))


@pytest.mark.parametrize("num_factors", [1, 2, 3])
def test_square_entry_points(num_factors):
    factors = [_rand(n, n, seed=n) for n in (3, 2, 4)[:num_factors]]
    K = KroneckerProductLinearOperator(*factors)
    assert not K.is_self_adjoint
    assert K.factors == tuple(factors)
    assert_operator_matches(K, _kron_dense(*factors))
    assert isinstance(K.adjoint(), KroneckerProductLinearOperator)
    assert_operator_matches(K.adjoint(), _kron_dense(*factors).T)


def test_symmetric_detection_and_psd():
    factors = [_spd(3, seed=1), _spd(2, seed=2)]
    K = KroneckerProductLinearOperator(*factors)
    assert K.is_self_adjoint and not K.is_psd and K.adjoint() is K
    Kp = KroneckerProductLinearOperator(*factors, symmetric=True, psd=True)
    assert Kp.is_psd
    assert not KroneckerProductLinearOperator(*factors, symmetric=False).is_self_adjoint


def test_rectangular_factors():
    factors = [_rand(3, 2, seed=4), _rand(2, 4, seed=5), _rand(1, 2, seed=6)]
    K = KroneckerProductLinearOperator(*factors)
    assert K.shape == (6, 16)
    assert_operator_matches(K, _kron_dense(*factors))
    assert K.frobenius_norm().item() == pytest.approx(
        torch.linalg.matrix_norm(_kron_dense(*factors)).item()
    )


def test_custom_shapes():
    """A factor acting on a flattened group of axes, e.g. a conv weight [out, in, kh, kw]."""
    G, A = _spd(2, seed=7), _spd(6, seed=8)
    K = KroneckerProductLinearOperator(G, A, in_shape=(2, 3, 2))
    assert K.in_shapes == K.out_shapes == [(2, 3, 2)] and K.is_self_adjoint
    assert_operator_matches(K, _kron_dense(G, A))
    R = KroneckerProductLinearOperator(_rand(3, 2), _rand(2, 2), in_shape=(4,), out_shape=(2, 3))
    assert R.out_shapes == [(2, 3)]
    assert_operator_matches(R, _kron_dense(_rand(3, 2), _rand(2, 2)))


FACTOR_SETS = {
    "2-spd": lambda: [_spd(3, seed=1), _spd(4, seed=2)],
    "3-spd": lambda: [_spd(2, seed=3), _spd(3, seed=4), _spd(2, seed=5)],
    "3-general": lambda: [_rand(2, 2, seed=6), _rand(3, 3, seed=7), _spd(2, seed=8)],
}


@pytest.mark.parametrize("case", FACTOR_SETS)
def test_closed_forms(case):
    factors = FACTOR_SETS[case]()
    K = KroneckerProductLinearOperator(*factors)
    dense = _kron_dense(*factors)
    torch.testing.assert_close(K.trace(), torch.trace(dense))
    torch.testing.assert_close(K.frobenius_norm(), torch.linalg.matrix_norm(dense))
    torch.testing.assert_close(K.diagonal(), torch.diagonal(dense))
    torch.testing.assert_close(K.det(), torch.linalg.det(dense))
    sign, logabsdet = torch.linalg.slogdet(dense)
    if sign > 0:
        torch.testing.assert_close(K.logdet(), logabsdet)
    else:
        with pytest.raises(ValueError, match="not positive definite"):
            K.logdet()


def test_logdet_negative_factor_even_power():
    """det(A ⊗ B) = det(A)^2 det(B)^2 > 0 for 2x2 factors even if det(A) < 0."""
    A = torch.diag(torch.tensor([1.0, -2.0], dtype=F64))
    B = _spd(2, seed=9)
    K = KroneckerProductLinearOperator(A, B)
    dense = _kron_dense(A, B)
    assert torch.linalg.det(dense) > 0
    torch.testing.assert_close(K.logdet(), torch.linalg.slogdet(dense)[1])


def test_logdet_singular_is_minus_inf():
    K = KroneckerProductLinearOperator(torch.zeros(2, 2, dtype=F64), _spd(3))
    assert K.logdet() == -float("inf") and K.det() == 0


@pytest.mark.parametrize("case", FACTOR_SETS)
def test_inverse_undamped(case):
    factors = FACTOR_SETS[case]()
    inv = KroneckerProductLinearOperator(*factors).inverse()
    assert isinstance(inv, KroneckerProductLinearOperator)
    assert_operator_matches(inv, torch.linalg.inv(_kron_dense(*factors)))


@pytest.mark.parametrize("case", ["2-spd", "3-spd"])
@pytest.mark.parametrize("psd", [False, True])
def test_inverse_damped_is_exact(case, psd):
    factors = FACTOR_SETS[case]()
    K = KroneckerProductLinearOperator(*factors, in_shape=None, symmetric=True, psd=psd)
    inv = K.inverse(damping=0.1)
    assert isinstance(inv, KroneckerEigenLinearOperator) and inv.in_shapes == K.in_shapes
    dense = _kron_dense(*factors)
    expected = torch.linalg.inv(dense + 0.1 * torch.eye(dense.shape[0], dtype=F64))
    assert_operator_matches(inv, expected)


def test_inverse_damped_with_custom_shape():
    G, A = _spd(2, seed=10), _spd(4, seed=11)
    K = KroneckerProductLinearOperator(G, A, in_shape=(2, 2, 2))
    inv = K.inverse(damping=0.3)
    assert inv.in_shapes == [(2, 2, 2)]
    assert_operator_matches(inv, torch.linalg.inv(_kron_dense(G, A) + 0.3 * torch.eye(8).double()))


@pytest.mark.parametrize("symmetric", [True, False])
def test_inverse_factor_damping(symmetric):
    factors = [_spd(3, seed=12), _spd(2, seed=13)]
    if not symmetric:
        factors[0] = factors[0] + 0.1 * _rand(3, 3, seed=14)
    K = KroneckerProductLinearOperator(*factors)
    assert K.is_self_adjoint == symmetric
    inv = K.inverse_factor_damping([0.2, 0.5])
    expected = _kron_dense(
        torch.linalg.inv(factors[0] + 0.2 * torch.eye(3, dtype=F64)),
        torch.linalg.inv(factors[1] + 0.5 * torch.eye(2, dtype=F64)),
    )
    assert_operator_matches(inv, expected)


def test_scaling_and_damping_algebra():
    factors = [_spd(3, seed=15), _rand(2, 2, seed=16)]
    K = KroneckerProductLinearOperator(*factors)
    dense = _kron_dense(*factors)
    scaled = -2.0 * K
    assert isinstance(scaled, KroneckerProductLinearOperator)
    assert_operator_matches(scaled, -2.0 * dense)
    assert_operator_matches(-K, -dense)
    eye = IdentityLinearOperator(K.in_shapes, dtype=F64, device="cpu")
    assert_operator_matches(K + 0.1 * eye, dense + 0.1 * torch.eye(6, dtype=F64))
    assert_operator_matches(K @ K.T, dense @ dense.T)


def test_float32():
    factors = [_spd(3, seed=17).float(), _spd(2, seed=18).float()]
    K = KroneckerProductLinearOperator(*factors)
    assert K.dtype == torch.float32
    assert_operator_matches(K, _kron_dense(*factors), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ errors
def test_error_bad_factors():
    with pytest.raises(ValueError, match="at least one Kronecker factor"):
        KroneckerProductLinearOperator()
    with pytest.raises(TypeError, match="separate arguments"):
        KroneckerProductLinearOperator([_rand(2, 2), _rand(2, 2)])
    with pytest.raises(ValueError, match="Kronecker factor 1 must have 2 dimension"):
        KroneckerProductLinearOperator(_rand(2, 2), _rand(3))
    with pytest.raises(TypeError, match="Kronecker factor 1 has dtype torch.float32"):
        KroneckerProductLinearOperator(_rand(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match="Kronecker factor 1 lives on device meta"):
        KroneckerProductLinearOperator(_rand(2, 2), torch.eye(2, dtype=F64, device="meta"))


def test_error_bad_shapes():
    with pytest.raises(ValueError, match=r"in_shape \(5,\) has 5 entries, but the factors need 6"):
        KroneckerProductLinearOperator(_rand(2, 2), _rand(3, 3), in_shape=(5,))
    with pytest.raises(ValueError, match=r"out_shape \(7,\) has 7 entries"):
        KroneckerProductLinearOperator(_rand(2, 2), _rand(3, 3), out_shape=(7,))
    with pytest.raises(ValueError, match="symmetric=True requires square factors"):
        KroneckerProductLinearOperator(_rand(2, 3), symmetric=True)
    with pytest.raises(ValueError, match="psd=True requires symmetric factors"):
        KroneckerProductLinearOperator(_rand(2, 2), psd=True, symmetric=False)


def test_error_closed_forms_need_square_factors():
    K = KroneckerProductLinearOperator(_rand(2, 3), _rand(3, 2))
    for method in ("trace", "diagonal", "det", "logdet", "inverse"):
        with pytest.raises(ValueError, match=rf"{method}\(\) requires square Kronecker factors"):
            getattr(K, method)()
    with pytest.raises(ValueError, match="requires square Kronecker factors"):
        K.inverse_factor_damping([0.0, 0.0])


def test_error_inverse():
    K = KroneckerProductLinearOperator(_rand(2, 2, seed=19), _spd(2))
    with pytest.raises(ValueError, match="requires symmetric factors"):
        K.inverse(damping=0.1)
    with pytest.raises(ValueError, match="Got 1 dampings for 2 Kronecker factors"):
        K.inverse_factor_damping([0.1])
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        K.inverse_factor_damping([0.1, -1.0])
    singular = KroneckerProductLinearOperator(_spd(2), torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="Kronecker factor 1 plus damping 0.0 is singular"):
        singular.inverse()
    zero = KroneckerProductLinearOperator(torch.zeros(2, 2, dtype=F64), symmetric=True)
    with pytest.raises(ValueError, match="singular"):
        zero.inverse()


def test_to_dense_with_strided_factors():
    """Factors from torch.linalg.eigh are column-major views; kron must still work."""
    M = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, Q = torch.linalg.eigh(M @ M.T)
    B = torch.eye(3, dtype=torch.float64)
    K = KroneckerProductLinearOperator(Q, B)
    torch.testing.assert_close(K.to_dense(), torch.kron(Q.contiguous(), B))
