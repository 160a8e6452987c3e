"""Batches of empty sequences (``T = 0``) contribute nothing to KFAC, EKFAC and diagonals.

Before, KFAC's statistics pass divided by zero ("integer division or modulo by zero") for
such a batch, ``forward-only`` with ``reduce`` returned NaN factors (a mean over zero
positions), and ``GGNLinearOperator.diagonal()`` failed with "stack expects a non-empty
TensorList" when the model is not a stack of linear layers.
"""

import pytest
import torch
from torch import nn

from curvops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    KFACLinearOperator,
)

DTYPE = torch.float64


class Shift(nn.Module):
    """``x + 0.1`` (a module the linear closed form of the diagonals does not cover)."""

    def forward(self, x):
        return x + 0.1


def _problem(loss_name, shift=False):
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)]
        model = nn.Sequential(*([Shift()] if shift else []), *layers).to(DTYPE)
    data = []
    for N, T in ((3, 2), (2, 0), (2, 3)):
        X = torch.randn(N, T, 2, generator=gen, dtype=DTYPE)
        if loss_name == "mse":
            y = torch.randn(N, T, 3, generator=gen, dtype=DTYPE)
        else:
            y = torch.randint(0, 2, (N, T, 3), generator=gen).to(DTYPE)
        data.append((X, y))
    loss = nn.MSELoss() if loss_name == "mse" else nn.BCEWithLogitsLoss(reduction="sum")
    return model, loss, data


def _without_empty(data):
    return [(X, y) for X, y in data if X.shape[1] > 0]


@pytest.mark.parametrize("terms", [None, 2])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_kfac_skips_empty_sequences(loss_name, fisher_type, kfac_approx, terms):
    model, loss, data = _problem(loss_name)
    params = list(model.parameters())
    options = {
        "fisher_type": fisher_type,
        "kfac_approx": kfac_approx,
        "num_per_example_loss_terms": terms,
    }
    K = KFACLinearOperator(model, loss, params, data, **options)
    R = KFACLinearOperator(model, loss, params, _without_empty(data), **options)
    torch.testing.assert_close(K.to_dense(), R.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_ekfac_skips_empty_sequences(kfac_approx):
    model, loss, data = _problem("mse")
    params = list(model.parameters())
    options = {"fisher_type": "type-2", "kfac_approx": kfac_approx}
    E = EKFACLinearOperator(model, loss, params, data, **options)
    R = EKFACLinearOperator(model, loss, params, _without_empty(data), **options)
    torch.testing.assert_close(E.to_dense(), R.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [False, True], ids=["linear-closed-form", "per-datum"])
@pytest.mark.parametrize("cls", [GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator])
def test_diagonal_skips_empty_sequences(cls, shift):
    model, loss, data = _problem("bce", shift=shift)
    params = list(model.parameters())
    D = cls(model, loss, params, data).diagonal()
    R = cls(model, loss, params, _without_empty(data))
    torch.testing.assert_close(D, R.diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(D, R.to_dense().diagonal(), rtol=1e-10, atol=1e-12)
