"""Hutch++ trace estimation: exact trace of a sketched subspace plus Hutchinson on the rest."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._checks import relative
from curvops.linalg.estimators._moments import RunningMoments
from curvops.linalg.estimators._setup import EstimatorRules
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
) -> Tensor | tuple[Tensor, Tensor]:
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
    products ``A @ S`` and ``A @ [Q, (I - QQᵀ) G]`` are two block products. The error
    estimate is the standard error of the Hutchinson part (the only random part given
    :math:`Q`); adaptive stopping adds further batches of :math:`m` deflated samples.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Budget :math:`N`, divisible by 3, with :math:`N / 3 \\leq D`.
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to also return the standard error (needs ``N >= 6``).
        target_rel_error: If given, keep adding batches of :math:`N/3` deflated samples
            until the standard error divided by the absolute estimate is at most this.
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimate (a 0-d tensor), and with ``return_error`` also its standard error.

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.
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
    moments = RunningMoments()
    moments.update((G_deflated * products[:, m:]).sum(0))
    used = setup.num_matvecs
    while target is not None and used < budget:
        estimate = sketch_trace + moments.mean
        if relative(moments.standard_error(), estimate) <= target:
            break
        batch = min(m, budget - used)
        G = setup.draw(batch)
        G_deflated = G - Q @ (Q.T @ G)
        moments.update((G_deflated * (A @ G_deflated)).sum(0))
        used += batch
    estimate = sketch_trace + moments.mean
    if return_error:
        return estimate, moments.standard_error()
    return estimate
