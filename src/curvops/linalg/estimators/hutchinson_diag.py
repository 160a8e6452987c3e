"""Diagonal estimation by Bekas, Kokiopoulou and Saad's extension of Hutchinson's method."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._adaptive import sample_in_rounds
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linear_operator import LinearOperator

_RULES = EstimatorRules("hutchinson_diag")


def hutchinson_diag(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
    target_rel_error: float | None = None,
    max_matvecs: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate the diagonal of :math:`A` from products with random vectors.

    For test vectors with :math:`\\mathbb{E}[v v^\\top] = I`,
    :math:`\\mathbb{E}[v \\odot A v]_j = \\sum_k A_{jk} \\mathbb{E}[v_j v_k] = A_{jj}`, so

    .. math::
        \\widehat{\\operatorname{diag}}(A) = \\frac{1}{N} \\sum_{i=1}^N v_i \\odot A v_i

    is unbiased (Bekas, Kokiopoulou, Saad (2007). An estimator for the diagonal of a matrix.
    Applied Numerical Mathematics). For Rademacher vectors it coincides with their
    normalized form :math:`(\\sum_i v_i \\odot A v_i) \\oslash (\\sum_i v_i \\odot v_i)`; for
    Gaussian vectors we keep the unbiased unnormalized form. The error estimate is the
    entrywise standard error of the mean. All products of a batch are one block product.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Number of test vectors :math:`N` (one product each); with
            ``target_rel_error``, the batch size of each round.
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to also return the entrywise standard errors (needs
            ``num_matvecs >= 2``).
        target_rel_error: If given, keep adding batches of ``num_matvecs`` samples until
            :math:`\\max_j \\text{err}_j / \\max_j |\\hat{a}_j|` is at most this (the error
            measure of the paper's Fig. 4).
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimated diagonal ``[D]`` (flat format), and with ``return_error`` also the
        standard errors ``[D]``.

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    return sample_in_rounds(setup, lambda V, AV: V * AV).result(return_error)
