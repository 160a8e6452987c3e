"""Inverse of an operator via a truncated (preconditioned) Neumann series."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from curvops.linalg._inputs import (
    as_linear_operator,
    check_positive_float,
    check_positive_int,
    require_square,
)
from curvops.linalg.inverses._base import (
    _IterativeInverseLinearOperator,
    check_preconditioner,
    column_norms,
)
from curvops.linear_operator import LinearOperator

# NOTE [Neumann divergence test]: write the series as x = sum_k y_k with y_0 = s P b and
# y_{k+1} = M y_k, M = I - s P A. For symmetric A and symmetric positive definite P, M is
# self-adjoint in the P^{-1} inner product, so ||y_k||_{P^{-1}} = ||S^k P^{-1/2} y_0||_2 with
# S = I - s P^{1/2} A P^{1/2} symmetric; k -> log ||S^k u||^2 is convex (a log-sum-exp of
# linear functions of k). Hence the term norms first decrease and, once they increase, grow
# for ever: the series diverges exactly when some eigenvalue of S has modulus > 1. The
# P^{-1}-norm is available without applying P^{-1}: w_k = P^{-1} y_k obeys w_0 = s b and
# w_{k+1} = w_k - s A y_k, reusing the product A y_k of the series itself. Rounding makes
# term norms at the level of machine precision noisy, so growth is only flagged above
# _GROWTH_TOLERANCE and above sqrt(eps) times the first term. For non-symmetric A or P the
# Euclidean norm is used, and transient growth up to _NONSYMMETRIC_GROWTH is tolerated.
_GROWTH_TOLERANCE = 1e-3
_NONSYMMETRIC_GROWTH = 100.0


@dataclass
class NeumannInfo:
    """Information about the last Neumann series evaluation (one entry per column).

    Attributes:
        last_term_norms: Norm of the last term relative to the first, ``[K]``. It estimates
            the relative truncation error :math:`\\rho^N / (1 - \\rho)` up to the factor
            :math:`1 / (1 - \\rho)`, with :math:`\\rho` the spectral radius of
            :math:`I - s P A`.
        num_matvecs: Total number of columns multiplied with :math:`A`.
    """

    last_term_norms: Tensor
    num_matvecs: int


class NeumannInverseLinearOperator(_IterativeInverseLinearOperator):
    """:math:`A^{-1}` approximated by a truncated Neumann series.

    .. math::
        A^{-1} \\approx s \\sum_{k=0}^{N-1} (I - s P A)^k P,

    with ``scale`` :math:`s`, ``num_terms`` :math:`N` and an optional preconditioner
    :math:`P \\approx A^{-1}` (default :math:`P = I`). It follows from
    :math:`(sPA)^{-1} = \\sum_k (I - sPA)^k`, which converges if and only if every
    eigenvalue of :math:`sPA` lies in the open disc of radius one around one; for
    symmetric positive definite :math:`A` (and :math:`P`) this means
    :math:`0 < s\\,\\lambda_{\\max}(PA) < 2`. The terms are computed recursively with one
    block product with :math:`A` per term. A diverging series raises an error (NOTE
    [Neumann divergence test] in this module) instead of returning garbage.

    Reference: the truncated Neumann series as an inverse-Hessian approximation is used e.g.
    in Agarwal, Bullins, Hazan (2017). Second-order stochastic optimization for machine
    learning in linear time.

    Examples:
        >>> import torch
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=torch.float64)
        >>> A_inv = NeumannInverseLinearOperator(A, num_terms=200, scale=1.0)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> torch.allclose(A_inv @ b, torch.linalg.solve(A, b))
        True
    """

    def __init__(
        self,
        A: LinearOperator | Tensor,
        *,
        num_terms: int = 100,
        scale: float = 1.0,
        preconditioner: LinearOperator | Tensor | None = None,
        progressbar: bool = False,
    ):
        """Set up the truncated series.

        Args:
            A: Square operator (or dense matrix) to invert.
            num_terms: Number of terms :math:`N` (costs :math:`N - 1` products with ``A``).
            scale: Step size :math:`s > 0`; must satisfy :math:`s < 2 / \\lambda_{\\max}(PA)`.
            preconditioner: Optional :math:`P \\approx A^{-1}`.
            progressbar: Whether to show a progress bar over the terms.

        Raises:
            ValueError: If ``A`` is not square, ``num_terms``/``scale`` are invalid, or the
                preconditioner does not match ``A``.
        """
        A = as_linear_operator(A)
        require_square(A, "NeumannInverseLinearOperator")
        self._num_terms = check_positive_int(num_terms, "num_terms")
        self._scale = check_positive_float(scale, "scale")
        P = check_preconditioner(preconditioner, A)
        super().__init__(A)
        self._P = P
        self._progressbar = progressbar
        self.is_self_adjoint = A.is_self_adjoint and (P is None or P.is_self_adjoint)
        self.last_info: NeumannInfo | None = None

    def _solve(self, B: Tensor, adjoint: bool) -> Tensor:
        A = self._A.adjoint() if adjoint else self._A
        P = None if self._P is None else (self._P.adjoint() if adjoint else self._P)
        s = self._scale
        symmetric = self._A.is_self_adjoint and (P is None or P.is_self_adjoint)
        eps = torch.finfo(B.dtype).eps

        Y = s * B if P is None else s * (P @ B)  # current term y_k
        W = s * B  # w_k = P^{-1} y_k (NOTE [Neumann divergence test])
        X = Y.clone()
        first = self._term_norm(Y, W, symmetric)
        smallest = first.clone()
        current = first
        num_matvecs = 0
        terms = range(1, self._num_terms)
        for k in tqdm(terms, disable=not self._progressbar, desc="Neumann"):
            AY = A @ Y
            num_matvecs += Y.shape[1]
            W = W - s * AY
            Y = Y - s * (AY if P is None else P @ AY)
            X = X + Y
            current = self._term_norm(Y, W, symmetric)
            self._check_growth(current, smallest, first, symmetric, eps, k)
            smallest = torch.minimum(smallest, current)

        safe_first = torch.where(first > 0, first, torch.ones_like(first))
        self.last_info = NeumannInfo(current / safe_first, num_matvecs)
        return X

    def _term_norm(self, Y: Tensor, W: Tensor, symmetric: bool) -> Tensor:
        """Norm of each term: :math:`\\|y\\|_{P^{-1}}` if symmetric, else :math:`\\|y\\|_2`."""
        if not symmetric:
            return column_norms(Y)
        if self._P is None:
            return column_norms(Y)
        squared = (Y * W).sum(0)
        scale = column_norms(Y) * column_norms(W)
        if bool((squared < -1e-8 * scale).any()):
            raise ValueError(
                "The preconditioner of NeumannInverseLinearOperator is not positive definite "
                "(y^T P^{-1} y < 0 for a term y). Pass a symmetric positive definite "
                "approximation of A^{-1}."
            )
        return squared.clamp(min=0).sqrt()

    def _check_growth(
        self,
        current: Tensor,
        smallest: Tensor,
        first: Tensor,
        symmetric: bool,
        eps: float,
        k: int,
    ) -> None:
        """Raise if the term norms grow (the series diverges)."""
        factor = (1 + _GROWTH_TOLERANCE) if symmetric else _NONSYMMETRIC_GROWTH
        growing = (current > factor * smallest) & (current > eps**0.5 * first)
        if bool(growing.any()):
            j = int(growing.nonzero()[0, 0])
            raise ValueError(
                f"The Neumann series diverges: in column {j}, the norm of term {k} grew to "
                f"{float(current[j]):.3g}, up from a minimum of {float(smallest[j]):.3g}. The "
                f"series converges only if all eigenvalues of scale * P @ A lie in (0, 2): "
                f"lower `scale` (currently {self._scale}) below 2 / lambda_max (estimate "
                f"lambda_max with curvops.linalg.eigsh(A, k=1)), and make sure A is positive "
                f"definite (add damping otherwise)."
            )
