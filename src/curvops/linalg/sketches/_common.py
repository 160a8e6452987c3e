"""Argument checks shared by the low-rank sketches (private)."""

from __future__ import annotations

from curvops.linalg._inputs import (
    as_linear_operator,
    check_positive_int,
    require_self_adjoint,
    require_square,
)
from curvops.linear_operator import LinearOperator


def check_sketch_arguments(
    A: object, rank: object, oversampling: object, routine: str
) -> tuple[LinearOperator, int, int]:
    """Validate the operator, target rank and oversampling of a symmetric sketch.

    Args:
        A: The operator (or dense matrix).
        rank: Target rank :math:`k`, ``1 <= k <= D``.
        oversampling: Extra test vectors :math:`p \\geq 0`.
        routine: Name of the calling routine, for error messages.

    Returns:
        The operator, the rank and the sketch size :math:`\\min(k + p, D)`.

    Raises:
        ValueError: If ``A`` is not square and symmetric, or ``rank``/``oversampling`` are
            invalid.
    """
    A = as_linear_operator(A)
    D = require_square(A, routine)
    require_self_adjoint(A, routine, "Sketch A.T @ A (or A @ A.T) for a non-symmetric A.")
    rank = check_positive_int(rank, "rank")
    if rank > D:
        raise ValueError(f"rank must be at most the dimension D={D}, got {rank}.")
    oversampling = check_positive_int(oversampling, "oversampling", minimum=0)
    return A, rank, min(rank + oversampling, D)
