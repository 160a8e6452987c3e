"""NOTE [RNG isolation of plain data]: the global RNG is saved and restored only when needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import EFLinearOperator, GGNLinearOperator
from curvops.kronecker import KFACLinearOperator


def _problem(model: nn.Module):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model.double()
        data = [(torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))) for n in (4, 2)]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def _operators(model, loss, params, data):
    kw = {"check_deterministic": False}
    yield GGNLinearOperator(model, loss, params, data, **kw)
    yield EFLinearOperator(model, loss, params, data, **kw)
    yield KFACLinearOperator(model, loss, params, data, **kw)


def _use(op) -> None:
    op @ torch.ones(op.shape[1], dtype=torch.float64)
    if hasattr(op, "diagonal"):
        op.diagonal()


def test_row_wise_models_on_lists_skip_the_generator_state(monkeypatch):
    model, loss, params, data = _problem(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))

    def refuse(*args, **kwargs):
        raise AssertionError("the RNG state was saved for a row-wise model on a list")

    monkeypatch.setattr(torch.random, "fork_rng", refuse)
    state = torch.random.get_rng_state()
    for op in _operators(model, loss, params, data):
        _use(op)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("container", ["list", "loader"])
def test_random_forward_passes_and_loaders_leave_the_global_rng_alone(container):
    """Dropout in training mode draws numbers; a shuffling loader draws its seed."""
    model, loss, params, data = _problem(
        nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2))
    )
    if container == "loader":
        from torch.utils.data import DataLoader, TensorDataset

        X = torch.cat([X for X, _ in data])
        y = torch.cat([y for _, y in data])
        data = DataLoader(TensorDataset(X, y), batch_size=3, shuffle=True)
        model.eval()  # the loader alone draws
    state = torch.random.get_rng_state()
    for op in _operators(model, loss, params, data):
        op @ torch.ones(op.shape[1], dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_determinism_check_restores_the_generator_it_seeds():
    """The check seeds the global generator: isolated even for a row-wise model on a list."""
    model, loss, params, data = _problem(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    state = torch.random.get_rng_state()
    GGNLinearOperator(model, loss, params, data)  # check_deterministic=True by default
    assert KFACLinearOperator(model, loss, params, data).factors
    assert torch.equal(torch.random.get_rng_state(), state)
