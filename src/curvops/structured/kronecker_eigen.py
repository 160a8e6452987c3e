"""A symmetric operator diagonal in a Kronecker-factored eigenbasis (EKFAC's structure).

The operator is

.. math::
    A = (Q_1 \\otimes \\cdots \\otimes Q_k) \\operatorname{diag}(\\operatorname{vec}_r(\\Lambda))
        (Q_1 \\otimes \\cdots \\otimes Q_k)^\\top

with orthogonal :math:`Q_i \\in \\mathbb{R}^{n_i \\times n_i}` and an eigenvalue tensor
:math:`\\Lambda` of shape :math:`(n_1, \\dots, n_k)` that need *not* be an outer product of
per-factor eigenvalues (George, Laurent, Bouthillier, Ballas, Vincent (2018). Fast
approximate natural gradient descent in a Kronecker-factored eigenbasis). The Kronecker order
and vectorization follow NOTE [Kronecker order] in :mod:`curvops.structured.kronecker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from math import prod

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator
from curvops.structured._checks import (
    as_scalar,
    check_damping,
    check_floating_tensor,
    check_orthonormal_columns,
    check_same_dtype_device,
    logdet_from_sign,
)
from curvops.structured._mode_product import mode_products


class KroneckerEigenLinearOperator(LinearOperator):
    """Symmetric operator with eigenvectors :math:`\\otimes_i Q_i` and eigenvalues :math:`\\Lambda`.

    Products rotate into the eigenbasis with mode products by :math:`Q_i^\\top`, scale
    elementwise by :math:`\\Lambda` and rotate back; they cost
    :math:`O(N \\sum_i n_i)` per column, :math:`N = \\prod_i n_i`, instead of :math:`O(N^2)`.
    The operator acts on one tensor of shape ``shape`` (default :math:`(n_1, \\dots, n_k)`).

    Examples:
        >>> import torch
        >>> Q1, Q2 = torch.eye(2), torch.eye(3)
        >>> A = KroneckerEigenLinearOperator([Q1, Q2], torch.arange(1.0, 7.0).reshape(2, 3))
        >>> float(A.trace()), A.shape
        (21.0, (6, 6))
    """

    is_self_adjoint = True

    def __init__(
        self,
        eigenvectors: Sequence[Tensor],
        eigenvalues: Tensor,
        *,
        shape: Sequence[int] | None = None,
        check_orthonormal: bool = True,
    ):
        """Store the per-factor eigenvectors and the eigenvalue tensor.

        Args:
            eigenvectors: ``k >= 1`` orthogonal matrices :math:`Q_i` of shape ``[n_i, n_i]``
                (eigenvectors in the columns).
            eigenvalues: :math:`\\Lambda`, shape ``(n_1, ..., n_k)``.
            shape: Shape of the tensor the operator acts on, with :math:`\\prod_i n_i`
                entries (e.g. a weight's shape). Default: ``(n_1, ..., n_k)``.
            check_orthonormal: Whether to verify :math:`Q_i^\\top Q_i = I` once.

        Raises:
            TypeError: If an input is not a floating-point tensor or the dtypes differ.
            ValueError: If shapes are inconsistent, devices differ, or a :math:`Q_i` is not
                orthogonal.
        """
        if isinstance(eigenvectors, Tensor) or not isinstance(eigenvectors, (list, tuple)):
            raise TypeError(
                "eigenvectors must be a list of matrices [Q_1, ..., Q_k], got "
                f"{type(eigenvectors).__name__}."
            )
        if len(eigenvectors) == 0:
            raise ValueError("eigenvectors is empty; pass at least one matrix.")
        for i, Q in enumerate(eigenvectors):
            check_floating_tensor(Q, f"eigenvectors[{i}]", ndim=2)
            if Q.shape[0] != Q.shape[1]:
                raise ValueError(
                    f"eigenvectors[{i}] must be square (a full orthogonal basis), got shape "
                    f"{tuple(Q.shape)}."
                )
        check_floating_tensor(eigenvalues, "eigenvalues")
        check_same_dtype_device(
            [(f"eigenvectors[{i}]", Q) for i, Q in enumerate(eigenvectors)]
            + [("eigenvalues", eigenvalues)]
        )
        sizes = tuple(Q.shape[0] for Q in eigenvectors)
        if tuple(eigenvalues.shape) != sizes:
            raise ValueError(
                f"eigenvalues must have shape {sizes} (one entry per pair of eigenvectors), got "
                f"{tuple(eigenvalues.shape)}."
            )
        shape = sizes if shape is None else tuple(int(s) for s in shape)
        if prod(shape) != prod(sizes):
            raise ValueError(
                f"shape {shape} has {prod(shape)} entries, but the eigenbasis has "
                f"{prod(sizes)} = prod{sizes}."
            )
        if check_orthonormal:
            for i, Q in enumerate(eigenvectors):
                check_orthonormal_columns(Q, f"eigenvectors[{i}]")
        super().__init__([shape], [shape], dtype=eigenvalues.dtype, device=eigenvalues.device)
        self._Qs = tuple(eigenvectors)
        self._lam = eigenvalues
        self._sizes = sizes
        self.is_psd = bool((eigenvalues >= 0).all())

    @property
    def eigenvectors(self) -> tuple[Tensor, ...]:
        """The per-factor eigenvector matrices :math:`(Q_1, \\dots, Q_k)`."""
        return self._Qs

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalue tensor :math:`\\Lambda`, shape :math:`(n_1, \\dots, n_k)`."""
        return self._lam

    def _new(self, eigenvalues: Tensor) -> KroneckerEigenLinearOperator:
        return KroneckerEigenLinearOperator(
            self._Qs, eigenvalues, shape=self._in_shapes[0], check_orthonormal=False
        )

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        (x,) = X
        num_cols = x.shape[-1]
        x = x.reshape(*self._sizes, num_cols)
        x = mode_products(x, [Q.T for Q in self._Qs])
        x = mode_products(self._lam.unsqueeze(-1) * x, self._Qs)
        return [x.reshape(*self._out_shapes[0], num_cols)]

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        return self._new(scale * self._lam)

    __rmul__ = __mul__

    def __neg__(self) -> KroneckerEigenLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Form the dense ``[N, N]`` matrix with ``torch.kron`` (for small N)."""
        Q = reduce(torch.kron, [q.contiguous() for q in self._Qs])  # eigh output may be strided
        return (Q * self._lam.reshape(-1)) @ Q.T

    # ---------------------------------------------------------------- closed forms
    def trace(self) -> Tensor:
        """Trace :math:`\\sum \\Lambda`."""
        return self._lam.sum()

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`\\|\\Lambda\\|_F`."""
        return torch.linalg.vector_norm(self._lam)

    def diagonal(self) -> Tensor:
        """Diagonal ``[N]`` (flat): mode products of :math:`\\Lambda` with :math:`Q_i \\odot Q_i`.

        :math:`A_{aa} = \\sum_{j} \\Lambda_{j_1 \\dots j_k} \\prod_i [Q_i]_{a_i j_i}^2`.
        """
        squares = [Q.square() for Q in self._Qs]
        return mode_products(self._lam.unsqueeze(-1), squares).reshape(-1)

    def det(self) -> Tensor:
        """Determinant :math:`\\prod \\Lambda`."""
        return self._lam.prod()

    def logdet(self) -> Tensor:
        """Log-determinant :math:`\\sum \\log \\Lambda` (NOTE [log-determinant semantics]).

        Raises:
            ValueError: If :math:`\\prod \\Lambda < 0`.
        """
        lam = self._lam.reshape(-1)
        sign = torch.tensor(0.0 if bool((lam == 0).any()) else (-1.0) ** int((lam < 0).sum()))
        return logdet_from_sign(sign, lam.abs().log().sum(), "KroneckerEigenLinearOperator")

    def inverse(self, damping: float = 0.0) -> KroneckerEigenLinearOperator:
        """Return :math:`(A + \\delta I)^{-1}`, with eigenvalues :math:`1/(\\Lambda + \\delta)`.

        Args:
            damping: :math:`\\delta \\geq 0`.

        Returns:
            The inverse as a :class:`KroneckerEigenLinearOperator`.

        Raises:
            ValueError: If an entry of :math:`\\Lambda + \\delta` is zero.
        """
        damping = check_damping(damping)
        shifted = self._lam + damping
        if bool((shifted == 0).any()):
            raise ValueError(
                f"An eigenvalue plus damping {damping} is zero, so the operator is singular. "
                f"Pass a damping that shifts all eigenvalues away from zero."
            )
        return self._new(1.0 / shifted)
