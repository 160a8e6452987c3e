"""Test problems for ``tests/kronecker``: small float64 nets, data, and block-diagonal masks.

Everything is built from fixed seeds without touching the global RNG state.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

DTYPE = torch.float64
BATCH_SIZES = (4, 3, 5)  # uneven batches


@contextmanager
def seeded(seed: int):
    """Run a block (e.g. module construction) with a fixed seed, restoring the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batches(X: Tensor, y: Tensor, sizes=BATCH_SIZES) -> list[tuple[Tensor, Tensor]]:
    """Split data into batches of the given (uneven) sizes."""
    out, start = [], 0
    for n in sizes:
        out.append((X[start : start + n], y[start : start + n]))
        start += n
    assert start == X.shape[0]
    return out


def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a module with a fixed seed in float64."""
    with seeded(seed):
        return factory().to(DTYPE)


def block_diagonal(G: Tensor, params: list[Tensor], groups: list[list[int]]) -> Tensor:
    """Keep the blocks of ``G`` coupling parameters within each group (indices into params)."""
    sizes = [p.numel() for p in params]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    mask = torch.zeros_like(G, dtype=torch.bool)
    for group in groups:
        idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in group])
        mask[idx[:, None], idx[None, :]] = True
    return torch.where(mask, G, torch.zeros_like(G))


def module_groups(model: nn.Module, params: list[Tensor], separate: bool) -> list[list[int]]:
    """Groups of parameter indices: one per module (joint) or one per parameter (separate)."""
    if separate:
        return [[i] for i in range(len(params))]
    index = {id(p): i for i, p in enumerate(params)}
    groups = []
    for module in model.modules():
        group = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
        if group:
            groups.append(group)
    return groups


class MeanOverPositions(nn.Module):
    """Average over the position axis 1 (aggregation before the loss, for KFAC-reduce)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class Scale(nn.Module):
    """A raw parameter used in ``forward`` around a child layer (fallback test)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.inner = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * self.scale


class EmbeddingGainNet(nn.Module):
    """Embedding, linear layers and a raw parameter (fallback); nonsingular KFAC."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 3)
        self.lin = nn.Linear(3, 4)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(4))
        self.out = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.lin(self.emb(ids))) * self.gain)


def embedding_gain_problem(seed: int = 0, num_data: int = 12, positions: int = 3):
    """Model, parameters and uneven batches of token sequences with regression targets."""
    model = build(EmbeddingGainNet, seed)
    g = generator(seed + 1)
    ids = torch.randint(0, 8, (num_data, positions), generator=g)
    data = batches(ids, torch.randn(num_data, positions, 3, generator=g, dtype=DTYPE))
    return model, list(model.parameters()), data


def eigh_failing_below_float64(monkeypatch) -> None:
    """Make ``torch.linalg.eigh`` fail unless its input is float64 (a simulated failure)."""
    original = torch.linalg.eigh

    def eigh(A):
        if A.dtype != torch.float64:
            raise torch.linalg.LinAlgError("simulated failure")
        return original(A)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
