"""Tests of ``curvops.linalg.submatrix``."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, generator, random_spd

from curvops.linalg import SubmatrixLinearOperator
from curvops.structured import TensorLinearOperator
from curvops.testing import assert_operator_matches


def test_rectangular_submatrix_of_tensor_list_operator():
    M = torch.randn(12, 10, generator=generator(0), dtype=DTYPE)
    A = TensorLinearOperator(M, [(2, 5)], [(3,), (9,)])
    rows, cols = [11, 0, 4, 5], [9, 3, 1]
    S = SubmatrixLinearOperator(A, rows, cols)
    assert S.shape == (4, 3) and not S.is_self_adjoint
    assert_operator_matches(S, M[rows][:, cols])


def test_symmetric_principal_submatrix_and_tensor_indices():
    M = random_spd(15, seed=1)
    idx = torch.tensor([7, 2, 14, 0])
    S = SubmatrixLinearOperator(M, idx, idx)
    assert S.is_self_adjoint
    assert_operator_matches(S, M[idx][:, idx])
    assert not SubmatrixLinearOperator(M, [0, 1], [1, 0]).is_self_adjoint


def test_bad_indices_raise():
    M = torch.eye(5, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"row_idxs must lie in \[0, 4\]"):
        SubmatrixLinearOperator(M, [0, 5], [0])
    with pytest.raises(ValueError, match=r"col_idxs must lie in \[0, 4\]"):
        SubmatrixLinearOperator(M, [0], [-1])
    with pytest.raises(ValueError, match="col_idxs contains duplicate"):
        SubmatrixLinearOperator(M, [0], [1, 1])
    with pytest.raises(ValueError, match="row_idxs is empty"):
        SubmatrixLinearOperator(M, [], [1])
    with pytest.raises(ValueError, match="must be one-dimensional"):
        SubmatrixLinearOperator(M, torch.zeros(1, 1, dtype=torch.long), [1])
    with pytest.raises(TypeError, match="row_idxs must hold Python ints"):
        SubmatrixLinearOperator(M, [0.0], [1])
    with pytest.raises(TypeError, match="must hold integers, got a tensor of dtype"):
        SubmatrixLinearOperator(M, torch.tensor([0.0]), [1])
    with pytest.raises(TypeError, match="must be a sequence of ints"):
        SubmatrixLinearOperator(M, 3, [1])
