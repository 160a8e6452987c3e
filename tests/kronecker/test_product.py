"""The planned products of the Kronecker family against dense Kronecker products."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, batches, build, generator
from torch import nn

from curvops.kronecker import (
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvops.kronecker.product import (
    DiagonalBlock,
    EigenCore,
    FactoredBlocks,
    KroneckerCore,
    MatrixBlock,
)
from curvops.testing import assert_operator_matches


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=generator(seed), dtype=DTYPE)


def _orthogonal(n, seed):
    return torch.linalg.qr(_randn(n, n, seed=seed))[0].contiguous()


def _apply_dense(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dense matrix onto every column of ``x`` ``[*shape, K]`` (row-major vectorisation)."""
    K = x.shape[-1]
    return (M @ x.reshape(-1, K)).reshape(x.shape)


@pytest.mark.parametrize("K", [1, 3])
def test_kronecker_core(K):
    L, R = _randn(3, 3, seed=1), _randn(4, 4, seed=2)
    a = _randn(3, seed=3)
    x = _randn(3, 4, K, seed=4)
    cases = [
        (KroneckerCore(L, R), torch.kron(L, R)),
        (KroneckerCore(a, R), torch.kron(torch.diag(a), R)),
        (KroneckerCore(L, None), torch.kron(L, torch.eye(4, dtype=DTYPE))),
        (KroneckerCore(None, R), torch.kron(torch.eye(3, dtype=DTYPE), R)),
        (KroneckerCore(L, R + R.T, symmetric=True), torch.kron(L, R + R.T)),
        (KroneckerCore(a, R + R.T, symmetric=True), torch.kron(torch.diag(a), R + R.T)),
    ]
    for core, dense in cases:
        torch.testing.assert_close(core(x), _apply_dense(dense, x))


@pytest.mark.parametrize("K", [1, 3])
def test_eigen_core(K):
    QL, QR = _orthogonal(3, 1), _orthogonal(4, 2)
    lam = _randn(3, 4, seed=3).abs()
    x = _randn(3, 4, K, seed=4)
    Q = torch.kron(QL, QR)
    dense = Q @ torch.diag(lam.reshape(-1)) @ Q.T
    torch.testing.assert_close(EigenCore(QL, QR, lam)(x), _apply_dense(dense, x))
    dense_right = torch.kron(torch.eye(3, dtype=DTYPE), QR)
    dense_right = dense_right @ torch.diag(lam.reshape(-1)) @ dense_right.T
    torch.testing.assert_close(EigenCore(None, QR, lam)(x), _apply_dense(dense_right, x))


def test_factored_blocks_on_interleaved_entries():
    """Conv-shaped weight, joint weight+bias, a bias alone and a diagonal, interleaved."""
    B1, A1 = _randn(2, 2, seed=1), _randn(12, 12, seed=2)  # conv weight [2, 3, 2, 2]
    B2, A2 = _randn(3, 3, seed=3), _randn(5, 5, seed=4)  # joint [W | b], W [3, 4]
    B3 = _randn(2, 2, seed=5)  # a bias alone
    d = _randn(2, 2, seed=6)
    shapes = [(3, 4), (2, 3, 2, 2), (2,), (2, 2), (3,)]
    blocks = [
        MatrixBlock((1,), (shapes[1],), KroneckerCore(B1, A1)),
        DiagonalBlock((3,), d),
        MatrixBlock((0, 4), (shapes[0], shapes[4]), KroneckerCore(B2, A2)),
        MatrixBlock((2,), (shapes[2],), KroneckerCore(B3, None)),
    ]
    op = FactoredBlocks(blocks, shapes, dtype=DTYPE, device=torch.device("cpu"), psd=False)
    # the joint block in the [W, b] order of the parameters: permute [W_mat | b] rows
    stacked = torch.arange(15).reshape(3, 5)
    order = torch.cat([stacked[:, :4].reshape(-1), stacked[:, 4]])
    joint = torch.kron(B2, A2)[order][:, order]
    sizes = [12, 24, 2, 4, 3]
    dense = torch.zeros(45, 45, dtype=DTYPE)
    offsets = [0, 12, 36, 38, 42, 45]
    idx = [torch.arange(offsets[i], offsets[i + 1]) for i in range(5)]
    w_b = torch.cat([idx[0], idx[4]])
    dense[w_b[:, None], w_b[None, :]] = joint
    dense[idx[1][:, None], idx[1][None, :]] = torch.kron(B1, A1)
    dense[idx[2][:, None], idx[2][None, :]] = B3
    dense[idx[3], idx[3]] = d.reshape(-1)
    assert [len(i) for i in idx] == sizes
    assert_operator_matches(op, dense, check_adjoint=False)


def test_blocks_must_cover_every_entry():
    block = DiagonalBlock((0,), torch.ones(2, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"cover the entries \[0\] of 2 entries"):
        FactoredBlocks([block], [(2,), (3,)], dtype=DTYPE, device=torch.device("cpu"), psd=True)


class Mixed(nn.Module):
    """Embedding, a conv, a joint or separate linear block, a LayerNorm fallback."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 2)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # [N, T - 1, 3]
        return self.out(self.norm(torch.tanh(h)))


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_products_match_the_structured_blocks(separate):
    """The planned products equal to_block_diagonal() (the structured operators)."""
    model = build(Mixed)
    g = generator(1)
    ids = torch.randint(0, 5, (12, 4), generator=g)
    data = batches(ids, torch.randn(12, 3, 2, generator=g, dtype=DTYPE))
    options = {
        "fisher_type": "type-2",
        "fallback": "diagonal",
        "separate_weight_and_bias": separate,
    }
    params = list(model.parameters())
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, **options)
    EK = EKFACLinearOperator(model, nn.MSELoss(), params, data, **options)
    operators = [
        K,
        EK,
        KFACInverseLinearOperator(K, damping=0.1),
        KFACInverseLinearOperator(K, damping=(0.05, 0.2)),
        KFACInverseLinearOperator(K, damping=0.1, use_heuristic_damping=True),
        KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True),
        EKFACInverseLinearOperator(EK, damping=0.1),
    ]
    for op in operators:
        structured = op.to_block_diagonal().to_dense()
        assert_operator_matches(op, structured, rtol=1e-10, atol=1e-12)
