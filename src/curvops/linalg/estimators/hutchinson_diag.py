"""Diagonal estimation by Bekas, Kokiopoulou and Saad's extension of Hutchinson's method."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._adaptive import sample_in_rounds
from curvops.linalg.estimators._moments import RunningMoments
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linalg.estimators.result import EstimateWithError
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
) -> Tensor | EstimateWithError:
    """Estimate the diagonal of :math:`A` from products with random vectors.

    For test vectors with :math:`\\mathbb{E}[v v^\\top] = I`,
    :math:`\\mathbb{E}[v \\odot A v]_j = \\sum_k A_{jk} \\mathbb{E}[v_j v_k] = A_{jj}`, so

    .. math::
        \\widehat{\\operatorname{diag}}(A) = \\frac{1}{N} \\sum_{i=1}^N v_i \\odot A v_i

    is unbiased (Bekas, Kokiopoulou, Saad (2007). An estimator for the diagonal of a matrix.
    Applied Numerical Mathematics). For Rademacher vectors it coincides with their
    normalized form :math:`(\\sum_i v_i \\odot A v_i) \\oslash (\\sum_i v_i \\odot v_i)`; for
    Gaussian vectors we keep the unbiased unnormalized form. Its ``error`` is the entrywise
    standard error of the mean widened by a Student-t factor with :math:`N - 1` degrees of
    freedom, so that ``estimate ± 2 * error`` is an approximate entrywise 95% interval (NOTE
    [estimator error bars] in :mod:`curvops.linalg.estimators._error_bars`). All products
    of a batch are one block product.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Number of test vectors :math:`N` (one product each); with
            ``target_rel_error``, the batch size of each round.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to return an :class:`~curvops.linalg.EstimateWithError` with
            the entrywise errors (needs ``num_matvecs >= 2``).
        target_rel_error: If given, keep adding batches of ``num_matvecs`` samples until
            :math:`\\max_j \\text{err}_j / \\max_j |\\hat{a}_j|` is at most this (the error
            measure of the paper's Fig. 4).
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimated diagonal ``[D]`` (flat format), or with ``return_error`` the pair
        ``(estimate, error)`` (both ``[D]``) as an :class:`~curvops.linalg.EstimateWithError`.

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.

    Warns:
        BudgetExhaustedWarning: If ``max_matvecs`` is spent before ``target_rel_error``.
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    rounds = sample_in_rounds(
        setup,
        RunningMoments(),
        lambda stats, V: stats.update(V * (setup.A @ V)),
        return_error=return_error,
    )
    return rounds.result(setup, return_error)
