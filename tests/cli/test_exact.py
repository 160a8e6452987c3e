"""Exact quantities where an operator offers them; dense matrices from column blocks."""

import pytest
import torch

from curvops.cli.exact import (
    dense_matrix,
    dense_steps,
    exact_diagonal,
    exact_trace,
    has_own_to_dense,
)
from curvops.linear_operator import LinearOperator
from curvops.structured import DiagonalLinearOperator, TensorLinearOperator


class _Products(LinearOperator):
    """A matrix known only through products, counting the columns."""

    is_self_adjoint = True

    def __init__(self, M):
        super().__init__([(M.shape[1],)], [(M.shape[0],)], dtype=M.dtype, device=M.device)
        self.M, self.columns = M, []

    def _matmat(self, X):
        self.columns.append(X[0].shape[-1])
        return [self.M @ X[0]]


class _RefusesDiagonal(_Products):
    def diagonal(self):
        raise NotImplementedError("no exact diagonal")

    def trace(self):
        raise NotImplementedError("no exact trace")


def _matrix(n=7):
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return B @ B.T


def test_dense_matrix_from_column_blocks():
    M = _matrix()
    A = _Products(M)
    assert not has_own_to_dense(A) and dense_steps(A, 3) == 3
    steps = []
    torch.testing.assert_close(dense_matrix(A, 3, lambda i, n: steps.append((i, n))), M)
    assert A.columns == [3, 3, 1] and steps == [(1, 3), (2, 3), (3, 3)]
    A.columns.clear()
    torch.testing.assert_close(dense_matrix(A, 100), M)
    assert A.columns == [7] and dense_steps(A, 100) == 1
    with pytest.raises(ValueError, match="columns must be a positive integer, got 0"):
        dense_matrix(A, 0)


def test_dense_matrix_of_a_structured_operator_uses_its_own_to_dense():
    d = torch.arange(1.0, 5.0, dtype=torch.float64)
    A = DiagonalLinearOperator(d)
    assert has_own_to_dense(A) and dense_steps(A, 1) == 1
    steps = []
    torch.testing.assert_close(dense_matrix(A, 1, lambda i, n: steps.append((i, n))), d.diag())
    assert steps == [(1, 1)]


def test_exact_trace_and_diagonal_where_offered():
    M = _matrix()
    A = TensorLinearOperator(M)
    assert float(exact_trace(A)) == pytest.approx(float(M.trace()))
    torch.testing.assert_close(exact_diagonal(A), M.diagonal())
    # a tensor-list diagonal is flattened in parameter order
    D = DiagonalLinearOperator([torch.ones(2, 2), 2 * torch.ones(3)])
    assert exact_diagonal(D).tolist() == [1.0] * 4 + [2.0] * 3


def test_no_exact_trace_or_diagonal():
    for A in (_Products(_matrix()), _RefusesDiagonal(_matrix())):
        assert exact_trace(A) is None and exact_diagonal(A) is None
        assert A.columns == []  # asking costs no products
