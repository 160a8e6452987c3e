"""A linear operator wrapping a dense matrix stored as a tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator
from curvops.structured._checks import (
    as_scalar,
    check_damping,
    check_floating_tensor,
    check_shapes_numel,
    require_square,
)
from curvops.structured._dense_linalg import dense_logdet, invert_dense, is_symmetric


class TensorLinearOperator(LinearOperator):
    """A dense matrix :math:`M` of shape ``[D_out, D_in]`` as a linear operator.

    The operator acts on tensor lists shaped like ``in_shapes`` through the flattening
    convention of :mod:`curvops.linear_operator`: a list is flattened, multiplied by
    :math:`M`, and split into ``out_shapes``.

    Examples:
        >>> import torch
        >>> M = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> A = TensorLinearOperator(M)
        >>> A.is_self_adjoint, float(A.trace()), float(A.det())
        (True, 5.0, 5.0)
    """

    def __init__(
        self,
        matrix: Tensor,
        in_shapes: Sequence[Sequence[int]] | None = None,
        out_shapes: Sequence[Sequence[int]] | None = None,
        *,
        symmetric: bool | None = None,
        psd: bool = False,
    ):
        """Wrap a dense matrix.

        Args:
            matrix: Floating-point matrix ``[D_out, D_in]``; its dtype and device become the
                operator's.
            in_shapes: Shapes of the input tensor list. Default: ``[(D_in,)]``.
            out_shapes: Shapes of the output tensor list. Default: ``[(D_out,)]``.
            symmetric: Whether :math:`M = M^\\top` (sets ``is_self_adjoint``). ``None``
                checks ``torch.allclose(M, M.T)`` for square matrices with
                ``in_shapes == out_shapes``.
            psd: Declare :math:`M` positive semi-definite (sets ``is_psd``; not checked).

        Raises:
            ValueError: If the shapes do not match the matrix, or ``symmetric``/``psd`` is
                declared for a matrix that cannot be symmetric.
        """
        check_floating_tensor(matrix, "matrix", ndim=2)
        d_out, d_in = matrix.shape
        in_shapes = [(d_in,)] if in_shapes is None else in_shapes
        out_shapes = [(d_out,)] if out_shapes is None else out_shapes
        in_shapes = check_shapes_numel(in_shapes, d_in, "in_shapes (the matrix's columns)")
        out_shapes = check_shapes_numel(out_shapes, d_out, "out_shapes (the matrix's rows)")
        super().__init__(in_shapes, out_shapes, dtype=matrix.dtype, device=matrix.device)
        self._matrix = matrix

        can_be_symmetric = d_out == d_in and in_shapes == out_shapes
        if symmetric is None:
            symmetric = can_be_symmetric and is_symmetric(matrix)
        elif symmetric and not can_be_symmetric:
            raise ValueError(
                f"symmetric=True requires a square matrix with in_shapes == out_shapes, got "
                f"shape {tuple(matrix.shape)}, in_shapes {in_shapes}, out_shapes {out_shapes}."
            )
        if psd and not symmetric:
            raise ValueError("psd=True requires a symmetric matrix; also pass symmetric=True.")
        self.is_self_adjoint = bool(symmetric)
        self.is_psd = bool(psd)

    @property
    def matrix(self) -> Tensor:
        """The wrapped matrix ``[D_out, D_in]``."""
        return self._matrix

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._flat_to_list(self._matrix @ self._list_to_flat(X), self._out_shapes)

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._flat_to_list(self._matrix.T @ self._list_to_flat(X), self._in_shapes)

    def adjoint(self) -> TensorLinearOperator:
        """Return :math:`M^\\top` as a :class:`TensorLinearOperator`."""
        if self.is_self_adjoint:
            return self
        return TensorLinearOperator(
            self._matrix.T, self._out_shapes, self._in_shapes, symmetric=False
        )

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        return TensorLinearOperator(
            scale * self._matrix,
            self._in_shapes,
            self._out_shapes,
            symmetric=self.is_self_adjoint,
            psd=self.is_psd and scale >= 0,
        )

    __rmul__ = __mul__

    def __neg__(self) -> TensorLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Return a copy of the matrix."""
        return self._matrix.clone()

    # ---------------------------------------------------------------- closed forms
    def _require_square(self, what: str) -> None:
        require_square(self.shape, "TensorLinearOperator", what)

    def trace(self) -> Tensor:
        """Trace :math:`\\operatorname{tr}(M) = \\sum_i M_{ii}` (square matrices only)."""
        self._require_square("trace()")
        return self._matrix.diagonal().sum()

    def diagonal(self) -> Tensor:
        """Diagonal ``[D]`` of the (square) matrix, in the flat format."""
        self._require_square("diagonal()")
        return self._matrix.diagonal().clone()

    def det(self) -> Tensor:
        """Determinant :math:`\\det M` (square matrices only)."""
        self._require_square("det()")
        return torch.linalg.det(self._matrix)

    def logdet(self) -> Tensor:
        """Log-determinant :math:`\\log \\det M` via ``torch.linalg.slogdet``.

        Returns ``-inf`` for a singular matrix (NOTE [log-determinant semantics]).

        Raises:
            ValueError: If the determinant is negative (the matrix is not positive definite).
        """
        self._require_square("logdet()")
        return dense_logdet(self._matrix, "TensorLinearOperator")

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`\\|M\\|_F = (\\sum_{ij} M_{ij}^2)^{1/2}`."""
        return torch.linalg.matrix_norm(self._matrix, ord="fro")

    def inverse(self, damping: float = 0.0) -> TensorLinearOperator:
        """Return :math:`(M + \\delta I)^{-1}` as a :class:`TensorLinearOperator`.

        The inverse is computed once (Cholesky for symmetric positive definite matrices,
        LU otherwise); products with it are dense matrix products. Its input shapes are this
        operator's output shapes and vice versa.

        Args:
            damping: :math:`\\delta \\geq 0`.

        Returns:
            The inverse operator (symmetric and PSD if this one is).

        Raises:
            ValueError: If the operator is not square, ``damping`` is negative, or
                :math:`M + \\delta I` is singular.
        """
        self._require_square("inverse()")
        damping = check_damping(damping)
        inv = invert_dense(
            self._matrix, damping, symmetric=self.is_self_adjoint, name="TensorLinearOperator"
        )
        return TensorLinearOperator(
            inv,
            self._out_shapes,
            self._in_shapes,
            symmetric=self.is_self_adjoint,
            psd=self.is_psd,
        )
