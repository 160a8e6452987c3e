"""XDiag: exchangeable, variance-reduced diagonal estimation."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg._sampling import Distribution
from curvops.linalg.estimators._adaptive import grow_exchangeable_sketch
from curvops.linalg.estimators._exchangeable_sketch import LeaveOneOutSketch
from curvops.linalg.estimators._setup import EstimatorRules
from curvops.linalg.estimators.result import EstimateWithError
from curvops.linear_operator import LinearOperator

_RULES = EstimatorRules("xdiag", sketch_parts=2, always_estimates_error=True)


def _xdiag_samples(sketch: LeaveOneOutSketch, *, rademacher: bool = True) -> tuple[Tensor, Tensor]:
    """The :math:`m` leave-one-out diagonal estimates :math:`d_i` of XDiag, ``[D, m]``.

    Args:
        sketch: The leave-one-out sketch.
        rademacher: Whether the test vectors are Rademacher (for the variance formula).

    Returns:
        The estimates :math:`d_i`, and the variance formula's entrywise estimate ``[D]`` of
        the variance of their mean (NOTE [XTrace error] in
        :mod:`curvops.linalg.estimators.xtrace`, for diagonals).
    """
    Omega = sketch.Omega
    m = Omega.shape[1]
    Q, AtQ, R, S = sketch.leave_one_out()
    Q_removed = Q @ S  # columns q~_i = Q s_i
    # diag(Q_(i) Q_(i)^T A) = diag(Q Q^T A) - q~_i * (A^T q~_i)
    exact_part = (Q * AtQ).sum(1, keepdim=True) - Q_removed * (AtQ @ S)
    # (I - Q_(i) Q_(i)^T) A w_i = q~_i (q~_i^T y_i) = q~_i (s_i^T R e_i), as y_i = Q R e_i
    residual = Q_removed * (S * R).sum(0)
    # Var(w_j (B w)_j) = sum_{k != j} B_jk^2 (Rademacher), ||B_j||^2 + B_jj^2 <= 2 ||B_j||^2
    # (otherwise), with B = (I - Q_(i) Q_(i)^T) A and E[(B w)_j^2] = ||B_j||^2
    factor = 1.0 if rademacher else 2.0
    variance = factor * (residual**2).mean(1) / m
    return exact_part + Omega * residual, variance


def xdiag(
    A: LinearOperator | Tensor,
    num_matvecs: int = 10,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    return_error: bool = False,
    target_rel_error: float | None = None,
    max_matvecs: int | None = None,
) -> Tensor | EstimateWithError:
    """Estimate the diagonal of :math:`A` with XDiag.

    XDiag (Epperly, Tropp, Webber (2024). XTrace: Making the most of every sample in
    stochastic trace estimation. SIAM J. Matrix Anal. Appl.) transfers XTrace to diagonals:
    with :math:`m = N/2` test vectors and the leave-one-out bases :math:`Q_{(i)}` of
    :math:`A \\omega_j`, :math:`j \\neq i`,

    .. math::
        d_i = \\operatorname{diag}(Q_{(i)} Q_{(i)}^\\top A)
        + \\omega_i \\odot (I - Q_{(i)} Q_{(i)}^\\top) A \\omega_i

    is unbiased (exact on the sketched range plus the estimator of Bekas et al. (2007) on
    the rest, with :math:`\\omega_i` independent of :math:`Q_{(i)}`). XDiag is the mean of
    the :math:`d_i`. Its entrywise ``error`` is, as for XTrace (NOTE [XTrace error] in
    :mod:`curvops.linalg.estimators.xtrace`), the larger of the standard error over the
    :math:`d_i` and the variance formula of the Hutchinson terms (:math:`\\sum_{k \\neq j}
    B_{jk}^2 \\leq \\|B_{j,:}\\|^2` for Rademacher vectors, :math:`\\leq 2 \\|B_{j,:}\\|^2`
    otherwise, :math:`B = (I - Q_{(i)} Q_{(i)}^\\top) A`), widened by the Student-t factor
    with :math:`m - 1` degrees of freedom (NOTE [estimator error bars] in
    :mod:`curvops.linalg.estimators._error_bars`). The exact part
    needs :math:`A^\\top Q`, so the second block product is with the adjoint (NOTE
    [leave-one-out sketch] in :mod:`curvops.linalg.estimators._exchangeable_sketch`).
    Adaptive stopping grows the sketch by :math:`N/2` test vectors per round, reusing all
    previous products.

    Args:
        A: Square operator (or dense matrix).
        num_matvecs: Budget :math:`N`, even, :math:`4 \\leq N` and :math:`N/2 \\leq D`.
        distribution: ``"rademacher"`` (default, as published: exact for diagonal
            matrices), ``"normal"`` or ``"sphere"`` test vectors.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        return_error: Whether to return an :class:`~curvops.linalg.EstimateWithError` with
            the entrywise errors.
        target_rel_error: If given, grow the sketch until
            :math:`\\max_j \\text{err}_j / \\max_j |\\hat{a}_j|` is at most this (or the sketch
            reaches dimension :math:`D`).
        max_matvecs: Budget of products when ``target_rel_error`` is given (required then).

    Returns:
        The estimated diagonal ``[D]`` (flat format), or with ``return_error`` the pair
        ``(estimate, error)`` (both ``[D]``) as an :class:`~curvops.linalg.EstimateWithError`.

    Raises:
        ValueError: If ``A`` is not square or an option is invalid.

    Warns:
        BudgetExhaustedWarning: If ``max_matvecs`` is spent (or the sketch reaches the
            dimension) before ``target_rel_error``.
    """
    setup = _RULES.setup(
        A, num_matvecs, distribution, generator, return_error, target_rel_error, max_matvecs
    )
    rademacher = setup.distribution == Distribution.RADEMACHER
    rounds = grow_exchangeable_sketch(
        setup,
        lambda sketch: _xdiag_samples(sketch, rademacher=rademacher),
        transpose_products=True,
    )
    return rounds.result(setup, return_error)
