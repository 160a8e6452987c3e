"""Randomized eigendecomposition of a symmetric operator (Halko, Martinsson, Tropp 2011)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg._inputs import check_positive_int
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.sketches._common import check_sketch_arguments
from curvops.linear_operator import LinearOperator
from curvops.structured import EigendecompositionLinearOperator


def randomized_eigh(
    A: LinearOperator | Tensor,
    rank: int,
    *,
    oversampling: int = 10,
    num_power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> EigendecompositionLinearOperator:
    """Rank-:math:`k` eigendecomposition :math:`A \\approx U \\Lambda U^\\top` by sketching.

    Randomized subspace iteration followed by a Rayleigh-Ritz step (Halko, Martinsson, Tropp
    (2011). Finding structure with randomness: Probabilistic algorithms for constructing
    approximate matrix decompositions. SIAM Review; Algorithms 4.4 and 5.3): with a Gaussian
    :math:`\\Omega \\in \\mathbb{R}^{D \\times \\ell}`, :math:`\\ell = k + p`,

    .. math::
        Q_0 = \\operatorname{orth}(A \\Omega),\\quad
        Q_{j} = \\operatorname{orth}(A Q_{j-1})\\ (j = 1..q),\\quad
        Q^\\top A Q = S \\Lambda S^\\top,\\quad U = Q S,

    keeping the :math:`k` eigenpairs of largest magnitude (so indefinite operators work).
    Each pass is one block product with :math:`\\ell` columns: :math:`q + 2` in total.

    Args:
        A: Symmetric operator (or dense matrix).
        rank: Rank :math:`k` of the approximation, ``1 <= k <= D``.
        oversampling: Extra test vectors :math:`p` (the sketch has
            :math:`\\min(k + p, D)` columns).
        num_power_iterations: Number :math:`q` of subspace iterations; more sharpen the
            subspace when the spectrum decays slowly.
        generator: Random number generator of the test matrix (NOTE [estimator randomness]
            in :mod:`curvops.linalg._sampling`).

    Returns:
        The approximation as an :class:`~curvops.structured.EigendecompositionLinearOperator`
        with ``A``'s tensor shapes, eigenvalues in ascending order.

    Raises:
        ValueError: If ``A`` is not square and symmetric, or an option is invalid.
    """
    A, rank, sketch_size = check_sketch_arguments(A, rank, oversampling, "randomized_eigh")
    num_power_iterations = check_positive_int(
        num_power_iterations, "num_power_iterations", minimum=0
    )
    Omega = random_test_matrix(
        A.shape[0], sketch_size, Distribution.NORMAL, generator, A.dtype, A.device
    )
    Q, _ = torch.linalg.qr(A @ Omega)
    for _ in range(num_power_iterations):
        Q, _ = torch.linalg.qr(A @ Q)
    B = Q.T @ (A @ Q)
    eigenvalues, S = torch.linalg.eigh(0.5 * (B + B.T))
    keep = torch.argsort(eigenvalues.abs(), descending=True)[:rank]
    keep = keep[torch.argsort(eigenvalues[keep])]
    return EigendecompositionLinearOperator(
        Q @ S[:, keep], eigenvalues[keep], A.in_shapes, check_orthonormal=False
    )
