"""Exact diagonals of KFAC, EKFAC and their inverses against their dense matrices."""

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
    KFOCLinearOperator,
)

N, T = 12, 3
TOL = {"rtol": 1e-10, "atol": 1e-13}


class Mixed(nn.Module):
    """Embedding (diagonal input factor), linear layers, a convolution, a LayerNorm fallback."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2, bias=False)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # [N, T - 1, 3]
        return self.out(self.norm(torch.tanh(self.lin(h))))


def make(cls=KFACLinearOperator, **options) -> KFACLinearOperator:
    model = build(Mixed)
    g = generator(1)
    ids = torch.randint(0, 5, (N, T), generator=g)
    data = batches(ids, torch.randn(N, T - 1, 2, generator=g, dtype=DTYPE))
    params = list(model.parameters())
    order = torch.randperm(len(params), generator=generator(2)).tolist()
    params = [params[i] for i in order]  # blocks on interleaved entries
    options = {"fisher_type": "type-2", "fallback": "diagonal"} | options
    return cls(model, nn.MSELoss(), params, data, **options)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_diagonal_matches_dense(cls, separate):
    K = make(cls, separate_weight_and_bias=separate)
    d = K.diagonal()
    assert d.shape == (K.shape[0],)
    torch.testing.assert_close(d, K.to_dense().diagonal(), **TOL)
    torch.testing.assert_close(d.sum(), K.trace(), **TOL)


@pytest.mark.parametrize(
    "options",
    [{"damping": 0.1}, {"damping": (0.05, 0.3)}, {"damping": 0.1, "use_exact_damping": True}],
    ids=["factor", "pair", "exact"],
)
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_inverse_diagonal_matches_dense(separate, options):
    inverse = KFACInverseLinearOperator(make(separate_weight_and_bias=separate), **options)
    torch.testing.assert_close(inverse.diagonal(), inverse.to_dense().diagonal(), **TOL)


def test_kfoc_diagonal_matches_dense():
    K = make(KFOCLinearOperator, separate_weight_and_bias=False)
    torch.testing.assert_close(K.diagonal(), K.to_dense().diagonal(), **TOL)


def test_ekfac_inverse_diagonal_matches_dense():
    inverse = EKFACInverseLinearOperator(make(EKFACLinearOperator), damping=0.1)
    torch.testing.assert_close(inverse.diagonal(), inverse.to_dense().diagonal(), **TOL)
