"""Tests of the operator algebra in ``curvops.linear_operator``."""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from curvops import LinearOperator
from curvops.linear_operator import FlatBackedList
from curvops.testing import assert_operator_matches


class _Dense(LinearOperator):
    """Minimal test operator wrapping a matrix (independent of the structured ops)."""

    def __init__(self, A, in_shapes, out_shapes):
        super().__init__(in_shapes, out_shapes, dtype=A.dtype, device=A.device)
        self.A = A

    def _matmat(self, X):
        return self._flat_to_list(self.A @ self._list_to_flat(X), self.out_shapes)

    def _adjoint_matmat(self, X):
        return self._flat_to_list(self.A.T @ self._list_to_flat(X), self.in_shapes)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def square():
    A = _rand(7, 7)
    return _Dense(A, [(3,), (2, 2)], [(3,), (2, 2)]), A


@pytest.fixture
def rect():
    A = _rand(5, 7, seed=1)
    return _Dense(A, [(3,), (2, 2)], [(5,)]), A


def test_entry_points_square(square):
    op, A = square
    assert_operator_matches(op, A)


def test_entry_points_rectangular(rect):
    op, A = rect
    assert op.shape == (5, 7)
    assert_operator_matches(op, A)


def test_algebra(square):
    op, A = square
    B_op = _Dense(_rand(7, 7, seed=2), op.in_shapes, op.out_shapes)
    B = B_op.A
    assert_operator_matches(op + B_op, A + B)
    assert_operator_matches(op - B_op, A - B)
    assert_operator_matches(-op, -A)
    assert_operator_matches(2.5 * op, 2.5 * A)
    assert_operator_matches(op * 2.5, 2.5 * A)
    assert_operator_matches(op / 4, A / 4)
    assert_operator_matches(op @ B_op, A @ B)
    assert_operator_matches(op.adjoint(), A.T)
    assert_operator_matches((op @ B_op).adjoint(), (A @ B).T)
    assert_operator_matches(op.T @ op - 3 * B_op, A.T @ A - 3 * B)


def test_left_multiplication_with_tensor_list(rect):
    op, A = rect
    u = _rand(5, seed=3)
    uA = [u] @ op
    assert [tuple(t.shape) for t in uA] == [(3,), (2, 2)]
    torch.testing.assert_close(torch.cat([t.flatten() for t in uA]), u @ A)


def test_chain_rectangular(rect, square):
    op, A = rect
    sq, S = square
    assert_operator_matches(op @ sq, A @ S)


def test_scipy_eigsh_runs_on_export():
    M = _rand(10, 10)
    M = M + M.T
    op = _Dense(M, [(10,)], [(10,)])
    op.is_self_adjoint = True
    evals = scipy.sparse.linalg.eigsh(op.to_scipy(), k=3, which="LA")[0]
    np.testing.assert_allclose(np.sort(evals), np.sort(torch.linalg.eigvalsh(M).numpy())[-3:])


def test_bad_inputs(square, rect):
    op, _ = square
    with pytest.raises(ValueError, match="flat vector of shape"):
        op @ torch.zeros(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="flat vector of shape"):
        op @ torch.zeros(7, 2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.zeros(7, dtype=torch.float32)
    with pytest.raises(ValueError, match="2 entries"):
        op @ [torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="match neither"):
        op @ [torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="match neither"):
        op @ [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64)]
    with pytest.raises(TypeError, match="to_scipy"):
        op @ np.zeros(7)
    r, _ = rect
    with pytest.raises(ValueError, match="Cannot add"):
        op + _Dense(_rand(7, 7), [(7,)], [(7,)])
    with pytest.raises(ValueError, match="Cannot chain"):
        op @ r
    with pytest.raises(ZeroDivisionError):
        op / 0
    with pytest.raises(ValueError, match="Left multiplication"):
        torch.zeros(2, 2, 7, dtype=torch.float64) @ op


class _PassThrough(LinearOperator):
    """The identity, returning its input list itself."""

    def _matmat(self, X):
        return X

    def _adjoint_matmat(self, X):
        return X


class _FreshBuffer(LinearOperator):
    """Twice the input, written into one fresh flat buffer (NOTE [flat-backed lists])."""

    def _matmat(self, X):
        flat = 2 * torch.cat([x.reshape(-1, x.shape[-1]) for x in X])
        views = self._flat_to_list(flat, self.out_shapes)
        return FlatBackedList(list(views), flat, fresh=True)

    _adjoint_matmat = _matmat


def test_flat_products_never_alias_the_input():
    op = _PassThrough([(3,), (2, 2)], [(3,), (2, 2)], dtype=torch.float64, device="cpu")
    for x in (_rand(7), _rand(7, 2)):
        y = op @ x
        torch.testing.assert_close(y, x)
        assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_fresh_flat_backed_output_is_returned_without_copy():
    op = _FreshBuffer([(3,), (2, 2)], [(3,), (2, 2)], dtype=torch.float64, device="cpu")
    captured = {}
    original = op._matmat

    def spy(X):
        result = original(X)
        captured["flat"] = result.flat
        return result

    op._matmat = spy
    x = _rand(7, 2)
    y = op @ x
    torch.testing.assert_close(y, 2 * x)
    assert y.data_ptr() == captured["flat"].data_ptr()
    assert_operator_matches(op, 2 * torch.eye(7, dtype=torch.float64))
