"""Squared Frobenius norm estimation with one product per sample."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg._inputs import as_linear_operator, parse_enum
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.estimators._checks import check_num_matvecs
from curvops.linalg.estimators._moments import RunningMoments
from curvops.linear_operator import LinearOperator


def hutchinson_squared_fro_halved(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate :math:`\\|A\\|_F^2` with one product per sample.

    Since :math:`\\|A\\|_F^2 = \\operatorname{tr}(A^\\top A) = \\mathbb{E}[\\|A v\\|^2]` for
    :math:`\\mathbb{E}[v v^\\top] = I`, every product :math:`A v_i` yields a sample
    (Hutchinson's method applied to :math:`A^\\top A` without forming the second product,
    the variant of the curvlinops paper, §4):

    .. math::
        \\widehat{\\|A\\|_F^2} = \\frac{1}{N} \\sum_{i=1}^N \\|A v_i\\|^2.

    For the same budget it takes twice as many samples as
    :func:`~curvops.linalg.hutchinson_squared_fro`, so its variance is about half. The error
    estimate is the standard error of the mean.

    Args:
        A: Any operator (or dense matrix), not necessarily square.
        num_matvecs: Number of products and samples :math:`N`.
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to also return the standard error (needs ``N >= 2``).

    Returns:
        The estimate (a 0-d tensor), and with ``return_error`` also its standard error.

    Raises:
        ValueError: If an option is invalid.
    """
    A = as_linear_operator(A)
    distribution = parse_enum(distribution, Distribution, "distribution")
    num_matvecs = check_num_matvecs(
        num_matvecs, "hutchinson_squared_fro_halved", minimum=2 if return_error else 1
    )
    V = random_test_matrix(A.shape[1], num_matvecs, distribution, generator, A.dtype, A.device)
    moments = RunningMoments()
    moments.update((A @ V).square().sum(0))
    return moments.result(return_error)
