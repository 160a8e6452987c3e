"""Test problems for ``tests/linalg``: random matrices and a product-counting operator."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from curvops import LinearOperator
from curvops.structured import TensorLinearOperator

DTYPE = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(D: int, seed: int) -> Tensor:
    """Q from the QR decomposition of a Gaussian matrix."""
    G = torch.randn(D, D, generator=generator(seed), dtype=DTYPE)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R))


def matrix_with_spectrum(eigenvalues: Tensor, seed: int) -> Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    Q = random_orthogonal(eigenvalues.numel(), seed)
    M = (Q * eigenvalues) @ Q.T
    return 0.5 * (M + M.T)


def power_law_matrix(D: int, c: float, seed: int = 0) -> Tensor:
    """The Fig. 4 problem of the paper: Q diag(i^{-c}) Q^T, i = 1..D."""
    i = torch.arange(1, D + 1, dtype=DTYPE)
    return matrix_with_spectrum(i ** (-c), seed)


def random_spd(D: int, seed: int = 0, cond: float = 100.0) -> Tensor:
    """Symmetric positive definite matrix with log-uniform eigenvalues in [1, cond]."""
    lam = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), D, dtype=DTYPE)
    return matrix_with_spectrum(lam, seed)


def random_indefinite(D: int, seed: int = 0) -> Tensor:
    """Symmetric indefinite matrix: a third of its eigenvalues in (-3, -1], the rest in [1, 5)."""
    g = generator(seed + 1000)
    lam = torch.rand(D, generator=g, dtype=DTYPE) * 4 + 1  # in [1, 5)
    lam[: D // 3] = -(torch.rand(D // 3, generator=g, dtype=DTYPE) * 2 + 1)  # in (-3, -1]
    return matrix_with_spectrum(lam, seed)


class CountingLinearOperator(LinearOperator):
    """Wraps an operator and counts block products and multiplied columns."""

    def __init__(self, A: LinearOperator):
        super().__init__(A.in_shapes, A.out_shapes, dtype=A.dtype, device=A.device)
        self._A = A
        self.is_self_adjoint = A.is_self_adjoint
        self.is_psd = A.is_psd
        self.num_columns = 0
        self.num_calls = 0

    def _matmat(self, X):
        self.num_calls += 1
        self.num_columns += X[0].shape[-1]
        return self._A._matmat(X)

    def _adjoint_matmat(self, X):
        self.num_calls += 1
        self.num_columns += X[0].shape[-1]
        return self._A.adjoint()._matmat(X)


def counting(M: Tensor, **kwargs) -> CountingLinearOperator:
    """A product-counting operator of a dense matrix."""
    return CountingLinearOperator(TensorLinearOperator(M, **kwargs))


def estimator_trials(estimator, M: Tensor, num_matvecs: int, num_runs: int, seed: int, **kwargs):
    """Run an estimator with ``return_error=True`` ``num_runs`` times from one generator.

    Returns:
        Stacked estimates and error estimates (``[num_runs]`` or ``[num_runs, D]``).
    """
    g = generator(seed)
    A = TensorLinearOperator(M)  # wrap once: wrapping a tensor checks its symmetry
    results = [
        estimator(A, num_matvecs, generator=g, return_error=True, **kwargs) for _ in range(num_runs)
    ]
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def relative_trace_errors(estimates: Tensor, M: Tensor) -> Tensor:
    """|t_hat - t| / |t| (the paper's Fig. 4 trace error)."""
    t = torch.trace(M)
    return (estimates - t).abs() / t.abs()


def relative_diag_errors(estimates: Tensor, M: Tensor) -> Tensor:
    """max_i |a_i - a_hat_i| / max_j |a_j| (the paper's Fig. 4 diagonal error), per run."""
    a = torch.diagonal(M)
    return (estimates - a).abs().amax(dim=-1) / a.abs().max()


def assert_unbiased_entrywise(estimates: Tensor, truth: Tensor) -> None:
    """The z-scores of the entrywise means over the runs (first axis) look standard normal."""
    z = (estimates.mean(0) - truth) / (estimates.std(0) / estimates.shape[0] ** 0.5)
    assert z.abs().max() < 5
    assert 0.6 < (z**2).mean() < 1.4


FIG4_DIM = 200
FIG4_RUNS = 200


@cache
def fig4_trials(estimator_name: str, c: float, num_matvecs: int, seed: int):
    """Cached ``estimator_trials`` of a ``curvops.linalg`` estimator on the Fig. 4 problem.

    Several test files compare the same runs; caching keeps the suite fast.
    """
    import curvops.linalg

    M = power_law_matrix(FIG4_DIM, c)
    estimator = getattr(curvops.linalg, estimator_name)
    return estimator_trials(estimator, M, num_matvecs, FIG4_RUNS, seed)
