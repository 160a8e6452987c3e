"""Every data-dependent operator type, built uniformly, for tests of cross-cutting safeguards.

Tests of input handling (empty batches, buffers, threads, non-finite values) must cover every
operator type; :func:`build_operator` constructs each from ``(model, loss, params, data)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from curvops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
)

DTYPE = torch.float64

OPERATOR_KINDS = ("hessian", "ggn", "ef", "mc-fisher", "jacobian", "kfac", "ekfac", "kfoc")
"""One entry per data-dependent operator type."""

_CLASSES = {
    "hessian": HessianLinearOperator,
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc-fisher": FisherMCLinearOperator,
    "kfac": KFACLinearOperator,
    "ekfac": EKFACLinearOperator,
    "kfoc": KFOCLinearOperator,
}


def build_operator(kind: str, model, loss_func, params, data, **kwargs):
    """Build the operator ``kind`` (one of :data:`OPERATOR_KINDS`); the Jacobian has no loss.

    KFAC, EKFAC and KFOC default to ``fisher_type="type-2"`` with the diagonal fallback.
    """
    if kind == "jacobian":
        return JacobianLinearOperator(model, params, data, **kwargs)
    if kind in ("kfac", "ekfac", "kfoc"):
        kwargs = {"fisher_type": "type-2", "fallback": "diagonal"} | kwargs
    return _CLASSES[kind](model, loss_func, params, data, **kwargs)


@contextmanager
def seeded(seed: int):
    """Run a block with a fixed seed, restoring the global RNG afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def mlp(seed: int = 0, d_in: int = 3, d_hidden: int = 4, d_out: int = 2) -> nn.Module:
    """A tiny float64 MLP (Linear-Tanh-Linear), built from a fixed seed."""
    with seeded(seed):
        model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))
    return model.to(DTYPE)


def classification_batches(sizes=(4, 3), d_in: int = 3, classes: int = 2, seed: int = 1):
    """Batches ``(X, y)`` of the given sizes with float64 inputs and class labels."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for n in sizes:
        X = torch.randn(n, d_in, generator=gen, dtype=DTYPE)
        data.append((X, torch.randint(0, classes, (n,), generator=gen)))
    return data


def random_vector(A, seed: int = 0) -> torch.Tensor:
    """A fixed random vector in ``A``'s input space."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(A.shape[1], generator=gen, dtype=A.dtype)
