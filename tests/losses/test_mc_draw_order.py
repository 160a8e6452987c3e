"""The MC would-be labels do not depend on the batching (NOTE [MC draw order]).

Before, ``MSELoss`` and ``BCEWithLogitsLoss`` drew their samples sample-major per batch (and
``torch.randn`` fills large tensors in interleaved blocks), so the same seed gave an MC Fisher
47% (MSE) away from itself on another batching of the same data.
"""

import pytest
import torch
from torch import nn

from curvops import FisherMCLinearOperator, KFACLinearOperator
from curvops.losses.likelihood import datum_major_normal

DTYPE = torch.float64


def _problem(loss_name):
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    X = torch.randn(7, 5, 3, generator=gen, dtype=DTYPE)  # sequences: 105 output entries
    if loss_name == "mse":
        y, loss = torch.randn(7, 5, 3, generator=gen, dtype=DTYPE), nn.MSELoss()
    else:
        y = torch.randint(0, 2, (7, 5, 3), generator=gen).to(DTYPE)
        loss = nn.BCEWithLogitsLoss(reduction="sum")
    return model, loss, X, y


def _batches(X, y, sizes):
    return list(zip(X.split(sizes), y.split(sizes)))


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_mc_fisher_same_for_every_batching(loss_name, mc_samples):
    model, loss, X, y = _problem(loss_name)
    params = list(model.parameters())
    dense = [
        FisherMCLinearOperator(
            model, loss, params, _batches(X, y, sizes), mc_samples=mc_samples, seed=5
        ).to_dense()
        for sizes in ([7], [1, 2, 4], [3, 1, 3])
    ]
    for other in dense[1:]:
        torch.testing.assert_close(other, dense[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_mc_kfac_same_for_every_batching(loss_name):
    model, loss, X, y = _problem(loss_name)
    params = list(model.parameters())
    ops = [
        KFACLinearOperator(model, loss, params, _batches(X, y, sizes), fisher_type="mc", seed=5)
        for sizes in ([7], [2, 5])
    ]
    for name, f in ops[0].factors.items():
        g = ops[1].factors[name]
        torch.testing.assert_close(g.gradient_factor, f.gradient_factor, rtol=1e-12, atol=1e-14)


def test_datum_major_normal_is_standard_normal():
    eps = datum_major_normal((100_000, 4), 2, torch.Generator().manual_seed(0), DTYPE, "cpu")
    assert eps.shape == (2, 100_000, 4)
    assert abs(float(eps.mean())) < 0.01
    assert abs(float(eps.var()) - 1) < 0.01
    assert abs(float((eps**4).mean()) - 3) < 0.05  # the kurtosis of a normal
    assert abs(float((eps[0] * eps[1]).mean())) < 0.01  # samples independent
