"""XTrace: exchangeable, variance-reduced trace estimation."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._adaptive import grow_exchangeable_sketch
from curvops.linalg.estimators._exchangeable_sketch import LeaveOneOutSketch
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linear_operator import LinearOperator

_RULES = EstimatorRules("xtrace", sketch_parts=2, always_estimates_error=True)


def _xtrace_samples(sketch: LeaveOneOutSketch) -> Tensor:
    """The :math:`m` leave-one-out Hutch++ estimates :math:`t_i` of XTrace, ``[m]``."""
    Omega, Y = sketch.Omega, sketch.Y
    Q, Z, _, S = sketch.leave_one_out()
    QtAQ = Q.T @ Z
    # tr(Q_(i)^T A Q_(i)) = tr(Q^T A Q) - s_i^T Q^T A Q s_i
    exact_part = torch.trace(QtAQ) - (S * (QtAQ @ S)).sum(0)
    # (I - Q_(i) Q_(i)^T) w_i = w_i - Q (W_i - s_i (s_i^T W_i)) with W = Q^T Omega
    W = Q.T @ Omega
    coeffs = W - S * (S * W).sum(0)
    deflated = Omega - Q @ coeffs
    A_deflated = Y - Z @ coeffs
    return exact_part + (deflated * A_deflated).sum(0)


def xtrace(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
    target_rel_error: float | None = None,
    max_matvecs: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate :math:`\\operatorname{tr}(A)` with XTrace.

    XTrace (Epperly, Tropp, Webber (2024). XTrace: Making the most of every sample in
    stochastic trace estimation. SIAM J. Matrix Anal. Appl.) uses :math:`m = N/2` test
    vectors :math:`\\omega_i` *both* to sketch and to estimate, with the exchangeability
    principle: for each :math:`i`, the basis :math:`Q_{(i)}` of :math:`A \\omega_j`,
    :math:`j \\neq i`, gives a Hutch++ estimate with test vector :math:`\\omega_i`,

    .. math::
        t_i = \\operatorname{tr}(Q_{(i)}^\\top A Q_{(i)}) + \\omega_i^\\top
        (I - Q_{(i)} Q_{(i)}^\\top) A (I - Q_{(i)} Q_{(i)}^\\top) \\omega_i,

    which is unbiased because :math:`\\omega_i` is independent of :math:`Q_{(i)}`. XTrace
    is their mean :math:`\\hat t = \\frac{1}{m}\\sum_i t_i`, and its error estimate is
    :math:`\\sqrt{\\sum_i (t_i - \\hat t)^2 / (m (m - 1))}`. All :math:`t_i` follow from two
    block products (NOTE [leave-one-out sketch] in
    :mod:`curvops.linalg.estimators._exchangeable_sketch`). Adaptive stopping grows the
    sketch by :math:`N/2` test vectors per round, reusing all previous products.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Budget :math:`N`, even, :math:`4 \\leq N` and :math:`N/2 \\leq D`.
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to also return the error estimate.
        target_rel_error: If given, grow the sketch until the error estimate divided by the
            absolute estimate is at most this (or the sketch reaches dimension :math:`D`).
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimate (a 0-d tensor), and with ``return_error`` also its error estimate.

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    estimate, error = grow_exchangeable_sketch(setup, _xtrace_samples, transpose_products=False)
    return (estimate, error) if return_error else estimate
