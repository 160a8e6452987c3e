"""The diagonal fallback equals the exact diagonal of the same curvature matrix."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, Scale, batches, build, generator
from torch import nn

from curvops.kronecker import KFACLinearOperator
from curvops.testing.dense import dense_ef, dense_ggn

N = 12


def problem():
    model = build(
        lambda: nn.Sequential(
            nn.Linear(3, 4),
            nn.LayerNorm(4),
            nn.Tanh(),
            Scale(4),
            nn.BatchNorm1d(4),
            nn.Linear(4, 3),
        )
    )
    with torch.no_grad():  # non-trivial running statistics for eval mode
        model[4].running_mean.uniform_(-0.5, 0.5)
        model[4].running_var.uniform_(0.5, 1.5)
    model.eval()
    g = generator(1)
    X = torch.randn(N, 3, generator=g, dtype=DTYPE)
    return model, X, g


@pytest.mark.parametrize(
    "fisher_type, loss_name", [("type-2", "CrossEntropyLoss"), ("empirical", "MSELoss")]
)
def test_fallback_diagonal_is_exact_diagonal(fisher_type, loss_name):
    model, X, g = problem()
    if loss_name == "CrossEntropyLoss":
        loss, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (N,), generator=g)
    else:
        loss, y = nn.MSELoss(reduction="sum"), torch.randn(N, 3, generator=g, dtype=DTYPE)
    data = batches(X, y)
    params = list(model.parameters())
    K = KFACLinearOperator(model, loss, params, data, fisher_type=fisher_type, fallback="diagonal")
    names = [n for n, _ in model.named_parameters()]
    fallback = {"1.weight", "1.bias", "3.scale", "4.weight", "4.bias"}
    assert set(K.fallback_diagonals) == fallback
    dense = (dense_ggn if fisher_type == "type-2" else dense_ef)(model, loss, params, data)
    diagonal = dense.diagonal().split([p.numel() for p in params])
    K_diagonal = K.to_dense().diagonal().split([p.numel() for p in params])
    for name, expected, d, k in zip(names, diagonal, K_diagonal, params):
        if name in fallback:
            torch.testing.assert_close(K.fallback_diagonals[name], expected.reshape(k.shape))
            torch.testing.assert_close(d, expected)
