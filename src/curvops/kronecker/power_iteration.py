r"""Alternating power iteration for the nearest Kronecker product of one block.

NOTE [KFOC power iteration]: the nearest Kronecker product :math:`B \otimes A` of a block
:math:`C` is :math:`\sigma_1 \operatorname{vec}(B_1) \operatorname{vec}(A_1)^\top`, the top
singular triplet of the rearranged block :math:`\mathcal{R}(C)` (Van Loan, C. F., Pitsianis,
N. (1993). Approximation with Kronecker products; NOTE [rearranged block] of
:mod:`curvops.kronecker.rearrangement`). Alternating products (Golub, G. H., Van Loan, C. F.
(2013). Matrix Computations, 4th ed., §8.6.1; the power method on
:math:`\mathcal{R}^\top\mathcal{R}`),

.. math::
    x_0 = \operatorname{vec}(I) / \|I\|_F, \qquad
    y_j = M_j x_j, \qquad x_{j+1} = y_j / \|y_j\|, \qquad
    M_j \in \{\mathcal{R}, \mathcal{R}^\top\} \text{ alternately},

converge to the top singular vectors at the rate :math:`(\sigma_2 / \sigma_1)^2` per pair of
products. Each product is one pass over the data (or over cached per-datum statistics). The
start :math:`A_0 = I` is symmetric positive definite and both products map PSD matrices to
PSD matrices, so every iterate is symmetric PSD: the result has PSD factors with the sign
fixed (Van Loan & Pitsianis, Thm. 5.8: the nearest Kronecker product of a PSD matrix has PSD
factors), up to round-off, which :func:`balanced_factors` removes by symmetrising.

Convergence is measured by the relative residual of the current pair as a singular pair: a
singular pair satisfies :math:`M_j x_j = \sigma x_{j-1}` with
:math:`\sigma = \|y_{j-1}\|`, so after each product

.. math::
    r_j = \|y_j - \|y_{j-1}\|\, x_{j-1}\| / \|y_{j-1}\|

costs no extra product; the iteration stops once :math:`r_j \leq` ``tolerance``. The
Frobenius error of the approximation exceeds the optimal one by
:math:`\mathcal{O}(r_j^2)\,\sigma_1^2` (the Rayleigh quotient's error is quadratic in the
angle). The result is the pair :math:`(y_j, x_j)`: for the last unit vector :math:`x_j` the
other factor :math:`y_j = M_j x_j` is the least-squares optimum.
"""

from __future__ import annotations

from math import inf, sqrt
from typing import Any

import torch
from torch import Tensor


def _norm(x: Tensor) -> float:
    """Frobenius norm, accumulated in float64.

    A float32 sum over the :math:`n^2` entries of a wide layer's factor loses digits (measured
    1e-4 relative for :math:`n = 2048`), enough to stall the residual of NOTE [KFOC power
    iteration] there.
    """
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


class NearestKroneckerIteration:
    """State of the alternating power iteration for one block (NOTE [KFOC power iteration]).

    The iterates are matrices (or, for an embedding's diagonal input factor, vectors); the
    inner product is the Frobenius one.

    Args:
        start: The start on the input side (:math:`A_0`, e.g. the identity); normalised here.
        output_shape: Shape of the other side's factor :math:`B`.
    """

    def __init__(self, start: Tensor, output_shape: tuple[int, ...]):
        self.input_side = True  # whether `current` is on the input (A) side
        self.current = start / _norm(start)
        self.previous: Tensor | None = None
        self._output_shape = tuple(output_shape)
        self.identity_scale: float | None = None
        self.sigma = inf
        self.residual = inf
        self.iterations = 0

    @classmethod
    def from_identity(
        cls, n: int, output_shape: tuple[int, ...], *, diagonal: bool, **like: Any
    ) -> NearestKroneckerIteration:
        r"""Start at :math:`A_0 = I / \|I\|_F` (a vector of ones for a diagonal :math:`A`).

        Until the first product, :attr:`identity_scale` holds :math:`1 / \|I\|_F`, so that
        the first product may skip the products with the identity.
        """
        start = torch.ones(n, **like) if diagonal else torch.eye(n, **like)
        it = cls(start, output_shape)
        it.identity_scale = 1.0 / sqrt(n)
        return it

    @property
    def converged_to_zero(self) -> bool:
        """Whether the block is zero (a product vanished)."""
        return self.sigma == 0.0

    def zeros_for_product(self) -> Tensor:
        """Zeros shaped like the next product (an accumulator for it)."""
        if self.previous is not None:  # the next product lands on the previous one's side
            return torch.zeros_like(self.previous)
        return self.current.new_zeros(self._output_shape)

    def update(self, product: Tensor) -> None:
        """Take the product of the block's rearrangement with :attr:`current`.

        Args:
            product: :math:`\\mathcal{R} x` if :attr:`current` is on the input side, else
                :math:`\\mathcal{R}^\\top x`.
        """
        self.iterations += 1
        self.identity_scale = None
        sigma = _norm(product)
        if self.previous is not None and self.sigma > 0:
            self.residual = _norm(product - self.sigma * self.previous) / self.sigma
        self.previous, self.sigma = self.current, sigma
        if sigma == 0.0:
            self.residual = 0.0
            self.current = torch.zeros_like(product)
        else:
            self.current = product / sigma
        self.input_side = not self.input_side

    def converged(self, tolerance: float) -> bool:
        """Whether the residual has reached ``tolerance`` (or the block is zero)."""
        return self.converged_to_zero or self.residual <= tolerance

    def balanced_factors(self) -> tuple[Tensor, Tensor]:
        r"""The factors :math:`(B, A)` of the current approximation, with equal norms.

        :math:`B \otimes A = \sigma\, x_\text{out} \otimes x_\text{in}` for the last product
        :math:`\sigma x_\text{out}` and its unit input :math:`x_\text{in}`, split as
        :math:`\|B\|_F = \|A\|_F = \sqrt\sigma`; matrices are symmetrised, and the sign
        is chosen with a non-negative trace (both only matter at the level of round-off,
        NOTE [KFOC power iteration]).

        Returns:
            :math:`B` and :math:`A` (a vector for a diagonal :math:`A`).
        """
        if self.previous is None:
            raise RuntimeError("The iteration has not taken a product yet.")
        root = sqrt(self.sigma)
        last, before = self.current * root, self.previous * root
        B, A = (before, last) if self.input_side else (last, before)
        B, A = _symmetrised(B), _symmetrised(A)
        if float(_trace(B)) < 0:
            B, A = -B, -A
        return B, A


def _symmetrised(M: Tensor) -> Tensor:
    return (M + M.T) / 2 if M.ndim == 2 else M


def _trace(M: Tensor) -> Tensor:
    return M.diagonal().sum() if M.ndim == 2 else M.sum()
