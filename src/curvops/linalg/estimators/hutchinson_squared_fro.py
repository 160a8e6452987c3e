"""Squared Frobenius norm estimation as the Hutchinson trace of :math:`A A^\\top`."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._adaptive import sample_in_rounds
from curvops.linalg.estimators._error_bars import QuadraticFormSamples
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linalg.estimators.result import EstimateWithError
from curvops.linear_operator import LinearOperator

_RULES = EstimatorRules(
    "hutchinson_squared_fro", products_per_sample=2, test_vectors="out", square=False
)


def hutchinson_squared_fro(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
    target_rel_error: float | None = None,
    max_matvecs: int | None = None,
) -> Tensor | EstimateWithError:
    """Estimate :math:`\\|A\\|_F^2 = \\operatorname{tr}(A A^\\top)` with Hutchinson's method.

    Each of the :math:`N/2` samples :math:`v_i \\in \\mathbb{R}^{D_\\text{out}}` costs two
    products, :math:`A (A^\\top v_i)` (Girard (1989); Hutchinson (1989), applied to
    :math:`A A^\\top`):

    .. math::
        \\widehat{\\|A\\|_F^2} = \\frac{2}{N} \\sum_{i=1}^{N/2} v_i^\\top A (A^\\top v_i).

    :func:`~curvops.linalg.hutchinson_squared_fro_halved` reaches the same accuracy with
    half the products. Its ``error`` is the standard error of the mean from the variance
    formula of the quadratic form with :math:`B = A A^\\top` (estimated from the products
    :math:`B v_i`), widened by a Student-t factor, so that ``estimate ± 2 * error`` is an
    approximate 95% interval (NOTE [estimator error bars] in
    :mod:`curvops.linalg.estimators._error_bars`).

    Args:
        A: Any operator (or dense matrix), not necessarily square.
        num_matvecs: Budget :math:`N` of products, even (two per sample); with
            ``target_rel_error``, the products of each round.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to return an :class:`~curvops.linalg.EstimateWithError`
            (needs ``N >= 4``).
        target_rel_error: If given, keep adding batches of ``num_matvecs`` products until
            the error divided by the absolute estimate is at most this.
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimate (a 0-d tensor), or with ``return_error`` the pair ``(estimate,
        error)`` as an :class:`~curvops.linalg.EstimateWithError`.

    Raises:
        ValueError: If an option is invalid.

    Warns:
        BudgetExhaustedWarning: If ``max_matvecs`` is spent before ``target_rel_error``.
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    A = setup.A
    rounds = sample_in_rounds(
        setup,
        QuadraticFormSamples(setup.distribution),
        lambda stats, V: stats.update(V, A @ (A.adjoint() @ V)),
        return_error=return_error,
        products_per_sample=2,
    )
    return rounds.result(setup, return_error)
