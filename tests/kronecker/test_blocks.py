"""Private glue operators of the Kronecker blocks against dense matrices."""

from __future__ import annotations

import torch
from helpers.kronecker_problems import DTYPE, generator

from curvops.kronecker.blocks import (
    EmbeddingKroneckerLinearOperator,
    RowDiagonalKroneckerLinearOperator,
    WeightBiasStacking,
)
from curvops.testing import assert_operator_matches


def test_weight_bias_stacking_is_the_column_appending_permutation():
    P = WeightBiasStacking((2, 3, 2), dtype=DTYPE, device="cpu")  # conv-like weight
    W = torch.arange(12, dtype=DTYPE).reshape(2, 3, 2)
    b = torch.tensor([100.0, 200.0], dtype=DTYPE)
    (M,) = P @ [W, b]
    torch.testing.assert_close(M, torch.cat([W.reshape(2, 6), b[:, None]], dim=1))
    dense = torch.zeros(14, 14, dtype=DTYPE)
    for row in range(2):
        for col in range(7):
            source = 12 + row if col == 6 else row * 6 + col
            dense[row * 7 + col, source] = 1.0
    assert_operator_matches(P, dense)


def test_row_diagonal_kronecker():
    g = generator(0)
    Q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DTYPE))[0].contiguous()
    lam = torch.rand(4, 3, generator=g, dtype=DTYPE)
    op = RowDiagonalKroneckerLinearOperator(Q, lam)
    big_Q = torch.kron(torch.eye(4, dtype=DTYPE), Q)
    assert_operator_matches(op, (big_Q * lam.reshape(-1)) @ big_Q.T)
    assert_operator_matches(
        RowDiagonalKroneckerLinearOperator(None, lam), torch.diag(lam.reshape(-1))
    )


def test_embedding_kronecker():
    g = generator(1)
    a = torch.rand(4, generator=g, dtype=DTYPE)
    M = torch.randn(3, 3, generator=g, dtype=DTYPE)
    B = M @ M.T
    assert_operator_matches(EmbeddingKroneckerLinearOperator(a, B), torch.kron(torch.diag(a), B))
