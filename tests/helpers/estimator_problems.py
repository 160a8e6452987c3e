"""Problem builders shared by the tests of ``curvops.linalg.estimators``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from helpers.linalg_problems import DTYPE, counting, generator, power_law_matrix
from torch import Tensor

from curvops.linalg.estimators._exchangeable_sketch import LeaveOneOutSketch
from curvops.structured import TensorLinearOperator


def grown_leave_one_out_sketch(
    D: int, growth: list[int], *, transpose_products: bool
) -> tuple[Tensor, Tensor, LeaveOneOutSketch]:
    """A random non-symmetric ``M`` ``[D, D]`` and test vectors, sketched in rounds.

    Args:
        D: Dimension.
        growth: Number of test vectors added in each round.
        transpose_products: Passed to :class:`LeaveOneOutSketch`.

    Returns:
        ``(M, Omega, sketch)`` with ``Omega`` ``[D, sum(growth)]`` all test vectors.
    """
    m = sum(growth)
    M = torch.randn(D, D, generator=generator(0), dtype=DTYPE)
    Omega = torch.randn(D, m, generator=generator(1), dtype=DTYPE)
    sketch = LeaveOneOutSketch(TensorLinearOperator(M), transpose_products=transpose_products)
    start = 0
    for n in growth:
        sketch.grow(Omega[:, start : start + n])
        start += n
    return M, Omega, sketch


def explicit_leave_one_out(M: Tensor, Omega: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """For each test vector ``w_i``: an explicit QR basis ``Q_i`` of ``M Omega_{-i}``.

    Yields:
        ``(Q_i, I - Q_i Q_i^T, w_i)`` for ``i = 0, ..., m - 1``.
    """
    D, m = Omega.shape
    for i in range(m):
        Q_i, _ = torch.linalg.qr(M @ Omega[:, [j for j in range(m) if j != i]])
        yield Q_i, torch.eye(D, dtype=DTYPE) - Q_i @ Q_i.T, Omega[:, i]


def adaptive_run(
    estimator: Callable, D: int, c: float, num_matvecs: int, *, seed: int, **adaptive
) -> tuple[Tensor, object, Tensor, Tensor]:
    """Run an estimator with an error estimate on a counting power-law operator.

    Args:
        estimator: A ``curvops.linalg`` trace or diagonal estimator.
        D: Dimension of the power-law matrix.
        c: Its spectral decay.
        num_matvecs: First budget.
        seed: Seed of the estimator's generator.
        **adaptive: ``target_rel_error`` and ``max_matvecs``.

    Returns:
        ``(M, A, estimate, error)`` with ``A`` the product-counting operator of ``M``.
    """
    M = power_law_matrix(D, c=c)
    A = counting(M)
    est, err = estimator(A, num_matvecs, generator=generator(seed), return_error=True, **adaptive)
    return M, A, est, err
