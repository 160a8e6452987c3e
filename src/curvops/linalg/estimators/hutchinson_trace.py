"""Girard-Hutchinson trace estimation."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._adaptive import sample_in_rounds
from curvops.linalg.estimators._error_bars import QuadraticFormSamples
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linalg.estimators.result import EstimateWithError
from curvops.linear_operator import LinearOperator

_RULES = EstimatorRules("hutchinson_trace")


def hutchinson_trace(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
    target_rel_error: float | None = None,
    max_matvecs: int | None = None,
) -> Tensor | EstimateWithError:
    """Estimate :math:`\\operatorname{tr}(A)` with the Girard-Hutchinson estimator.

    For test vectors with :math:`\\mathbb{E}[v v^\\top] = I`,
    :math:`\\operatorname{tr}(A) = \\mathbb{E}[v^\\top A v]`, so the sample mean over
    :math:`N` vectors is unbiased (Girard (1989). A fast 'Monte-Carlo cross-validation'
    procedure for large least squares problems with noisy data; Hutchinson (1989). A
    stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines):

    .. math::
        \\widehat{\\operatorname{tr}}(A) = \\frac{1}{N} \\sum_{i=1}^N v_i^\\top A v_i.

    Its ``error`` is the standard error of the mean from the variance formula of the
    quadratic form (e.g. :math:`2(\\|A\\|_F^2 - \\sum_j A_{jj}^2) / N` for Rademacher
    vectors, estimated from the products :math:`A v_i`), widened by a Student-t factor, so
    that ``estimate ± 2 * error`` is an approximate 95% interval even at small :math:`N`
    (NOTE [estimator error bars] in :mod:`curvops.linalg.estimators._error_bars`). All
    products of a batch are one block product ``A @ V``.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Number of test vectors :math:`N` (one product each); with
            ``target_rel_error``, the batch size of each round.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to return an :class:`~curvops.linalg.EstimateWithError`
            (needs ``num_matvecs >= 2``).
        target_rel_error: If given, keep adding batches of ``num_matvecs`` samples until
            the error divided by the absolute estimate is at most this.
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimate (a 0-d tensor), or with ``return_error`` the pair ``(estimate,
        error)`` as an :class:`~curvops.linalg.EstimateWithError` (which also holds the
        products spent and whether the target was reached).

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.

    Warns:
        BudgetExhaustedWarning: If ``max_matvecs`` is spent before ``target_rel_error``.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> est = hutchinson_trace(A, 5, generator=torch.Generator().manual_seed(0))
        >>> float(est)  # Rademacher vectors are exact for diagonal matrices
        55.0
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    stats = QuadraticFormSamples(setup.distribution)
    rounds = sample_in_rounds(
        setup, stats, lambda s, V: s.update(V, setup.A @ V), return_error=return_error
    )
    return rounds.result(setup, return_error)
