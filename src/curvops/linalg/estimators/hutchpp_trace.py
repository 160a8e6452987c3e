"""Hutch++ trace estimation: exact trace of a sketched subspace plus Hutchinson on the rest."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._adaptive import Rounds
from curvops.linalg.estimators._checks import relative
from curvops.linalg.estimators._error_bars import QuadraticFormSamples
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linalg.estimators.result import EstimateWithError
from curvops.linear_operator import LinearOperator

_RULES = EstimatorRules("hutchpp_trace", sketch_parts=3)


def hutchpp_trace(
    A: LinearOperator | Tensor,
    num_matvecs: int = 12,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
    target_rel_error: float | None = None,
    max_matvecs: int | None = None,
) -> Tensor | EstimateWithError:
    """Estimate :math:`\\operatorname{tr}(A)` with Hutch++.

    Hutch++ (Meyer, Musco, Musco, Woodruff (2021). Hutch++: Optimal stochastic trace
    estimation. SOSA) splits the budget :math:`N` into three parts of :math:`m = N/3`
    products: a sketch :math:`Q = \\operatorname{orth}(A S)` of the dominant range, the
    exact trace of :math:`A` on it, and Hutchinson's estimator on the deflated remainder,

    .. math::
        \\widehat{\\operatorname{tr}}(A) = \\operatorname{tr}(Q^\\top A Q)
        + \\frac{1}{m} \\sum_{i=1}^m g_i^\\top (I - QQ^\\top) A (I - QQ^\\top) g_i,

    with independent test matrices :math:`S, G \\in \\mathbb{R}^{D \\times m}`. It is
    unbiased, and much more accurate than Hutchinson when the spectrum decays fast. The
    products ``A @ S`` and ``A @ [Q, (I - QQᵀ) G]`` are two block products. The ``error``
    is that of the Hutchinson part (the only random part given :math:`Q`): the standard
    error from the variance formula of the quadratic form with :math:`B = (I - QQ^\\top) A
    (I - QQ^\\top)`, estimated from the products :math:`B g_i`, widened by a Student-t factor
    with :math:`m - 1` degrees of freedom (NOTE [estimator error bars] in
    :mod:`curvops.linalg.estimators._error_bars`); adaptive stopping adds further batches
    of :math:`m` deflated samples.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Budget :math:`N`, divisible by 3, with :math:`N / 3 \\leq D`.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to return an :class:`~curvops.linalg.EstimateWithError`
            (needs ``N >= 6``).
        target_rel_error: If given, keep adding batches of :math:`N/3` deflated samples
            until the error divided by the absolute estimate is at most this.
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimate (a 0-d tensor), or with ``return_error`` the pair ``(estimate,
        error)`` as an :class:`~curvops.linalg.EstimateWithError`.

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.

    Warns:
        BudgetExhaustedWarning: If ``max_matvecs`` is spent before ``target_rel_error``.
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    A, target, budget = setup.A, setup.target, setup.budget
    m = setup.num_matvecs // 3

    S, G = setup.draw(m), setup.draw(m)
    Q, _ = torch.linalg.qr(A @ S)
    G_deflated = G - Q @ (Q.T @ G)
    products = A @ torch.cat([Q, G_deflated], dim=1)
    sketch_trace = (Q * products[:, :m]).sum()
    # the samples g^T B g with B = (I - QQ^T) A (I - QQ^T) and the products B g (for the
    # variance formula) come from A (I - QQ^T) G without further products
    samples = QuadraticFormSamples(setup.distribution)
    samples.update(G, products[:, m:] - Q @ (Q.T @ products[:, m:]))
    used = setup.num_matvecs
    while target is not None and used < budget:
        if relative(samples.error(), sketch_trace + samples.mean) <= target:
            break
        batch = min(m, budget - used)
        G = setup.draw(batch)
        AG_deflated = A @ (G - Q @ (Q.T @ G))
        samples.update(G, AG_deflated - Q @ (Q.T @ AG_deflated))
        used += batch
    error = samples.error() if return_error or target is not None else None
    return Rounds(sketch_trace + samples.mean, error, used).result(setup, return_error)
