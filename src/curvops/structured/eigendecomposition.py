"""A symmetric operator given by (part of) its eigendecomposition.

NOTE [eigenbasis complement]: :class:`EigendecompositionLinearOperator` represents

.. math::
    A = Q \\operatorname{diag}(\\lambda) Q^\\top + c\\,(I - Q Q^\\top),

with :math:`Q \\in \\mathbb{R}^{D \\times k}` having orthonormal columns. The first term is the
(possibly low-rank, :math:`k < D`) eigendecomposition; the second assigns the eigenvalue
:math:`c` (``complement_eigenvalue``, default 0) to the :math:`D - k` directions orthogonal to
the columns of :math:`Q`. The family is closed under damped inversion,

.. math::
    (A + \\delta I)^{-1} = Q \\operatorname{diag}\\!\\left(\\frac{1}{\\lambda + \\delta}\\right)
    Q^\\top + \\frac{1}{c + \\delta} (I - Q Q^\\top),

which for :math:`c = 0` is the familiar inverse of a damped low-rank matrix
(Halko, Martinsson, Tropp (2011). Finding structure with randomness).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator
from curvops.structured._checks import (
    as_scalar,
    check_damping,
    check_floating_tensor,
    check_orthonormal_columns,
    check_same_dtype_device,
    check_shapes_numel,
    logdet_from_sign,
)


class EigendecompositionLinearOperator(LinearOperator):
    """Symmetric :math:`A = Q \\operatorname{diag}(\\lambda) Q^\\top + c (I - Q Q^\\top)`.

    See NOTE [eigenbasis complement] in this module. With :math:`k < D` and :math:`c = 0`
    this is a rank-:math:`k` matrix (e.g. a truncated eigendecomposition from Lanczos or a
    randomized sketch). Products cost :math:`O(D k)` per column.

    Examples:
        >>> import torch
        >>> Q = torch.eye(3, dtype=torch.float64)[:, :2]
        >>> A = EigendecompositionLinearOperator(Q, torch.tensor([2.0, 3.0], dtype=torch.float64))
        >>> float(A.trace()), float(A.inverse(damping=1.0).trace())
        (5.0, 1.5833333333333333)
    """

    is_self_adjoint = True

    def __init__(
        self,
        eigenvectors: Tensor,
        eigenvalues: Tensor,
        shapes: Sequence[Sequence[int]] | None = None,
        *,
        complement_eigenvalue: float = 0.0,
        check_orthonormal: bool = True,
    ):
        """Store the eigenvectors and eigenvalues.

        Args:
            eigenvectors: :math:`Q`, shape ``[D, k]`` with ``k <= D`` orthonormal columns.
            eigenvalues: :math:`\\lambda`, shape ``[k]``.
            shapes: Shapes of the tensor list the operator acts on (input and output).
                Default: ``[(D,)]``.
            complement_eigenvalue: :math:`c`, the eigenvalue of every direction orthogonal to
                the columns of :math:`Q` (irrelevant if ``k == D``).
            check_orthonormal: Whether to verify :math:`Q^\\top Q = I` (costs
                :math:`O(D k^2)` once).

        Raises:
            ValueError: If the shapes are inconsistent or the columns are not orthonormal.
            TypeError: If the tensors are not floating point or their dtypes differ.
        """
        check_floating_tensor(eigenvectors, "eigenvectors", ndim=2)
        check_floating_tensor(eigenvalues, "eigenvalues", ndim=1)
        check_same_dtype_device([("eigenvectors", eigenvectors), ("eigenvalues", eigenvalues)])
        D, k = eigenvectors.shape
        if eigenvalues.shape[0] != k:
            raise ValueError(
                f"Got {k} eigenvectors (columns of a {D}x{k} matrix) but "
                f"{eigenvalues.shape[0]} eigenvalues; pass one eigenvalue per column."
            )
        if k > D:
            raise ValueError(
                f"Got k={k} eigenvectors of dimension D={D}; at most D orthonormal vectors "
                f"exist. Pass eigenvectors of shape [D, k] (one eigenvector per column)."
            )
        c = as_scalar(complement_eigenvalue)
        if c is None:
            raise TypeError(
                f"complement_eigenvalue must be a real number, got "
                f"{type(complement_eigenvalue).__name__}."
            )
        shapes = [(D,)] if shapes is None else shapes
        shapes = check_shapes_numel(shapes, D, "shapes (the eigenvectors' dimension D)")
        if check_orthonormal:
            check_orthonormal_columns(eigenvectors, "eigenvectors")
        super().__init__(shapes, shapes, dtype=eigenvectors.dtype, device=eigenvectors.device)
        self._Q = eigenvectors
        self._lam = eigenvalues
        self._c = c
        self.is_psd = bool((eigenvalues >= 0).all()) and (k == D or c >= 0)

    # ---------------------------------------------------------------- properties
    @property
    def eigenvectors(self) -> Tensor:
        """The eigenvectors :math:`Q`, shape ``[D, k]``."""
        return self._Q

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalues :math:`\\lambda`, shape ``[k]``."""
        return self._lam

    @property
    def complement_eigenvalue(self) -> float:
        """The eigenvalue :math:`c` of the orthogonal complement of the columns of :math:`Q`."""
        return self._c

    @property
    def _rank_deficit(self) -> int:
        return self._Q.shape[0] - self._Q.shape[1]

    # ---------------------------------------------------------------- products
    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        x = self._list_to_flat(X)
        coeffs = self._Q.T @ x
        out = self._Q @ ((self._lam - self._c).unsqueeze(-1) * coeffs)
        if self._c != 0.0:
            out = out + self._c * x
        return self._flat_to_list(out, self._out_shapes)

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        return EigendecompositionLinearOperator(
            self._Q,
            scale * self._lam,
            self._in_shapes,
            complement_eigenvalue=scale * self._c,
            check_orthonormal=False,
        )

    __rmul__ = __mul__

    def __neg__(self) -> EigendecompositionLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Form :math:`Q \\operatorname{diag}(\\lambda - c) Q^\\top + c I` (``[D, D]``)."""
        dense = (self._Q * (self._lam - self._c)) @ self._Q.T
        if self._c != 0.0:
            dense = dense + self._c * torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return dense

    # ---------------------------------------------------------------- closed forms
    def trace(self) -> Tensor:
        """Trace :math:`\\sum_i \\lambda_i + (D - k) c`."""
        return self._lam.sum() + self._rank_deficit * self._c

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`(\\sum_i \\lambda_i^2 + (D - k) c^2)^{1/2}`."""
        return (self._lam.square().sum() + self._rank_deficit * self._c**2).sqrt()

    def diagonal(self) -> Tensor:
        """Diagonal ``[D]``: :math:`A_{jj} = \\sum_i Q_{ji}^2 (\\lambda_i - c) + c`."""
        return self._Q.square() @ (self._lam - self._c) + self._c

    def det(self) -> Tensor:
        """Determinant :math:`\\prod_i \\lambda_i \\cdot c^{D - k}` (0 if low rank with c = 0)."""
        return self._lam.prod() * self._c**self._rank_deficit

    def logdet(self) -> Tensor:
        """Log-determinant :math:`\\sum_i \\log \\lambda_i + (D - k) \\log c`.

        Returns ``-inf`` if an eigenvalue is zero (NOTE [log-determinant semantics]).

        Raises:
            ValueError: If ``k < D`` and ``c == 0`` (the matrix is rank-deficient), or the
                determinant is negative.
        """
        if self._rank_deficit and self._c == 0.0:
            raise ValueError(
                f"logdet() of a rank-{self._Q.shape[1]} EigendecompositionLinearOperator of "
                f"dimension {self._Q.shape[0]}: the matrix is singular (log-determinant -inf). "
                f"Use `inverse(damping)` / a complement_eigenvalue > 0 for a regularized matrix."
            )
        lam = self._lam
        if self._rank_deficit:
            lam = torch.cat([lam, lam.new_full((1,), self._c)])
        mult = torch.ones_like(lam)
        if self._rank_deficit:
            mult[-1] = self._rank_deficit
        num_negative = int(((lam < 0) * mult).sum())
        sign = torch.tensor(0.0 if bool((lam == 0).any()) else (-1.0) ** num_negative)
        logabsdet = (mult * lam.abs().log()).sum()
        return logdet_from_sign(sign, logabsdet, "EigendecompositionLinearOperator")

    def inverse(self, damping: float = 0.0) -> EigendecompositionLinearOperator:
        """Return :math:`(A + \\delta I)^{-1}` in the same eigenbasis (exact, no solve).

        See NOTE [eigenbasis complement]: the eigenvalues become :math:`1 / (\\lambda + \\delta)`
        and :math:`1 / (c + \\delta)`.

        Args:
            damping: :math:`\\delta \\geq 0`. Must be positive for a low-rank operator with
                :math:`c = 0`.

        Returns:
            The inverse as an :class:`EigendecompositionLinearOperator`.

        Raises:
            ValueError: If :math:`A + \\delta I` is singular.
        """
        damping = check_damping(damping)
        if self._rank_deficit and self._c + damping == 0.0:
            raise ValueError(
                f"The EigendecompositionLinearOperator has rank {self._Q.shape[1]} < dimension "
                f"{self._Q.shape[0]}, so it is singular: pass damping > 0 to invert "
                f"A + damping * I."
            )
        shifted = self._lam + damping
        if bool((shifted == 0).any()):
            raise ValueError(
                f"An eigenvalue plus damping {damping} is zero, so the operator is singular. "
                f"Pass a damping that shifts all eigenvalues away from zero."
            )
        c_inv = 1.0 / (self._c + damping) if self._rank_deficit else 0.0
        return EigendecompositionLinearOperator(
            self._Q,
            1.0 / shifted,
            self._in_shapes,
            complement_eigenvalue=c_inv,
            check_orthonormal=False,
        )
