"""Tests of ``curvops.structured.tensor``."""

import pytest
import torch

from curvops.structured import TensorLinearOperator
from curvops.testing import assert_operator_matches


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _spd(n, seed=0):
    X = _rand(n, n, seed=seed)
    return X @ X.T + n * torch.eye(n, dtype=torch.float64)


def test_square_default_shapes():
    M = _rand(6, 6)
    op = TensorLinearOperator(M)
    assert op.in_shapes == [(6,)] and op.out_shapes == [(6,)]
    assert not op.is_self_adjoint
    assert_operator_matches(op, M)


def test_rectangular_with_tensor_list_shapes():
    M = _rand(5, 7, seed=1)
    op = TensorLinearOperator(M, in_shapes=[(3,), (2, 2)], out_shapes=[(5,)])
    assert op.shape == (5, 7)
    assert_operator_matches(op, M)
    assert_operator_matches(op.adjoint(), M.T)
    assert isinstance(op.adjoint(), TensorLinearOperator)


def test_symmetry_detection_and_declaration():
    S = _spd(4)
    assert TensorLinearOperator(S).is_self_adjoint
    op_s = TensorLinearOperator(S)
    assert op_s.adjoint() is op_s
    assert not TensorLinearOperator(_rand(4, 4)).is_self_adjoint
    assert not TensorLinearOperator(S, symmetric=False).is_self_adjoint
    # different in/out shapes cannot be self-adjoint
    assert not TensorLinearOperator(S, [(2, 2)], [(4,)]).is_self_adjoint
    op = TensorLinearOperator(S, [(2, 2)], [(2, 2)], symmetric=True, psd=True)
    assert op.is_self_adjoint and op.is_psd
    assert_operator_matches(op, S)


def test_closed_forms_against_torch_linalg():
    S = _spd(5, seed=3)
    op = TensorLinearOperator(S, [(1,), (2, 2)], [(1,), (2, 2)])
    torch.testing.assert_close(op.trace(), torch.trace(S))
    torch.testing.assert_close(op.det(), torch.linalg.det(S))
    torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(S)[1])
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(S))
    torch.testing.assert_close(op.diagonal(), torch.diagonal(S))
    torch.testing.assert_close(op.to_dense(), S)


@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["spd", "general"])
def test_inverse(kind, damping):
    M = _spd(5, seed=4) if kind == "spd" else _rand(5, 5, seed=4) + 5 * torch.eye(5).double()
    op = TensorLinearOperator(M, [(5,)], [(5,)])
    inv = op.inverse(damping=damping)
    assert isinstance(inv, TensorLinearOperator)
    assert inv.is_self_adjoint == (kind == "spd")
    expected = torch.linalg.inv(M + damping * torch.eye(5, dtype=torch.float64))
    assert_operator_matches(inv, expected)


def test_inverse_symmetric_indefinite_falls_back_to_lu():
    S = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    inv = TensorLinearOperator(S).inverse()
    assert_operator_matches(inv, torch.linalg.inv(S))


def test_inverse_rectangular_shapes_swap():
    M = _rand(6, 6, seed=5) + 6 * torch.eye(6).double()
    op = TensorLinearOperator(M, in_shapes=[(2, 3)], out_shapes=[(6,)])
    inv = op.inverse()
    assert inv.in_shapes == [(6,)] and inv.out_shapes == [(2, 3)]
    assert_operator_matches(inv, torch.linalg.inv(M))


def test_logdet_singular_is_minus_inf():
    op = TensorLinearOperator(torch.zeros(3, 3, dtype=torch.float64))
    assert op.logdet() == float("-inf")


def test_scaling_stays_structured():
    S = _spd(4, seed=6)
    op = TensorLinearOperator(S, psd=True, symmetric=True)
    scaled = 2.0 * op
    assert isinstance(scaled, TensorLinearOperator) and scaled.is_psd
    assert_operator_matches(scaled, 2.0 * S)
    neg = -op
    assert isinstance(neg, TensorLinearOperator) and not neg.is_psd
    assert_operator_matches(neg, -S)
    assert_operator_matches(op / 4, S / 4)
    assert_operator_matches(op * torch.tensor(3.0), 3 * S)


def test_algebra_with_other_operators():
    A, B = _rand(4, 4, seed=7), _rand(4, 4, seed=8)
    opA, opB = TensorLinearOperator(A), TensorLinearOperator(B)
    assert_operator_matches(opA + opB, A + B)
    assert_operator_matches(opA @ opB, A @ B)


# ------------------------------------------------------------------ errors
def test_error_not_a_matrix():
    with pytest.raises(ValueError, match="must have 2 dimension"):
        TensorLinearOperator(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        TensorLinearOperator([[1.0]])
    with pytest.raises(TypeError, match="must be floating point"):
        TensorLinearOperator(torch.zeros(2, 2, dtype=torch.int64))


def test_error_bad_shapes():
    with pytest.raises(ValueError, match=r"in_shapes .* describe 5 entries, but 4"):
        TensorLinearOperator(torch.zeros(4, 4).double(), in_shapes=[(5,)])
    with pytest.raises(ValueError, match=r"out_shapes .* describe 6 entries, but 4"):
        TensorLinearOperator(torch.zeros(4, 4).double(), out_shapes=[(2, 3)])
    with pytest.raises(ValueError, match="must be a list of shapes"):
        TensorLinearOperator(torch.zeros(4, 4).double(), in_shapes=[4])
    with pytest.raises(ValueError, match="negative dimension"):
        TensorLinearOperator(torch.zeros(4, 4).double(), in_shapes=[(-2, -2)])


def test_error_declared_symmetry():
    with pytest.raises(ValueError, match="symmetric=True requires a square matrix"):
        TensorLinearOperator(torch.zeros(3, 4).double(), symmetric=True)
    with pytest.raises(ValueError, match="psd=True requires a symmetric"):
        TensorLinearOperator(_rand(3, 3), symmetric=False, psd=True)


def test_error_closed_forms_need_square():
    op = TensorLinearOperator(_rand(3, 4))
    for method in ("trace", "diagonal", "det", "logdet", "inverse"):
        with pytest.raises(ValueError, match=rf"{method}\(\) requires a square operator"):
            getattr(op, method)()


def test_error_negative_determinant():
    op = TensorLinearOperator(torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="not positive definite"):
        op.logdet()


def test_error_inverse_singular_and_bad_damping():
    op = TensorLinearOperator(torch.zeros(3, 3, dtype=torch.float64), symmetric=False)
    with pytest.raises(ValueError, match="singular"):
        op.inverse()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        op.inverse(damping=-1.0)
    with pytest.raises(TypeError, match="damping must be a real number"):
        op.inverse(damping="1")


def test_error_mismatched_input_dtype():
    op = TensorLinearOperator(_rand(3, 3))
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.zeros(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="Only scalars"):
        op * torch.ones(2)


def test_float32_products():
    M = _rand(4, 4, seed=9).float()
    op = TensorLinearOperator(M)
    assert op.dtype == torch.float32
    assert_operator_matches(op, M, rtol=1e-5, atol=1e-6)
