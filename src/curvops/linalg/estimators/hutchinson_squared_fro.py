"""Squared Frobenius norm estimation as the Hutchinson trace of :math:`A A^\\top`."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg._inputs import as_linear_operator, parse_enum
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.estimators._checks import check_num_matvecs
from curvops.linalg.estimators._moments import RunningMoments
from curvops.linear_operator import LinearOperator


def hutchinson_squared_fro(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate :math:`\\|A\\|_F^2 = \\operatorname{tr}(A A^\\top)` with Hutchinson's method.

    Each of the :math:`N/2` samples :math:`v_i \\in \\mathbb{R}^{D_\\text{out}}` costs two
    products, :math:`A (A^\\top v_i)` (Girard (1989); Hutchinson (1989), applied to
    :math:`A A^\\top`):

    .. math::
        \\widehat{\\|A\\|_F^2} = \\frac{2}{N} \\sum_{i=1}^{N/2} v_i^\\top A (A^\\top v_i).

    :func:`~curvops.linalg.hutchinson_squared_fro_halved` reaches the same accuracy with
    half the products. The error estimate is the standard error of the mean.

    Args:
        A: Any operator (or dense matrix), not necessarily square.
        num_matvecs: Budget :math:`N` of products, even (two per sample).
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to also return the standard error (needs ``N >= 4``).

    Returns:
        The estimate (a 0-d tensor), and with ``return_error`` also its standard error.

    Raises:
        ValueError: If an option is invalid.
    """
    A = as_linear_operator(A)
    distribution = parse_enum(distribution, Distribution, "distribution")
    num_matvecs = check_num_matvecs(
        num_matvecs,
        "hutchinson_squared_fro (two products per sample)",
        multiple_of=2,
        minimum=4 if return_error else 2,
    )
    V = random_test_matrix(A.shape[0], num_matvecs // 2, distribution, generator, A.dtype, A.device)
    moments = RunningMoments()
    moments.update((V * (A @ (A.adjoint() @ V))).sum(0))
    return moments.result(return_error)
