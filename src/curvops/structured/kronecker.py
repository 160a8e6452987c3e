"""Kronecker products :math:`A_1 \\otimes \\cdots \\otimes A_k` acting on one tensor.

NOTE [Kronecker order]: ``curvops`` vectorizes tensors **row-major** (PyTorch's
``flatten``), :math:`\\operatorname{vec}_r(X)_{i n_2 + j} = X_{ij}`. With this convention

.. math::
    (A \\otimes B) \\operatorname{vec}_r(X) = \\operatorname{vec}_r(A X B^\\top),

so the *first* factor acts on the *first* (slowest-varying) axis of ``X``; in general
:math:`A_1 \\otimes \\cdots \\otimes A_k` multiplies :math:`A_i` onto axis :math:`i` of a tensor
of shape :math:`(n_1, \\dots, n_k)`. The dense matrix is ``torch.kron(A_1, ..., A_k)``
(whose row/column index :math:`(a_1, \\dots, a_k)` is also row-major). For a linear layer
with weight :math:`W \\in \\mathbb{R}^{d_\\text{out} \\times d_\\text{in}}` this means KFAC
reads :math:`G \\otimes A` (output-gradient factor first, input factor second) on ``W``.
The column-major convention of Martens & Grosse (2015) writes the same matrix as
:math:`A \\otimes G` acting on :math:`\\operatorname{vec}_c(W)`.
Reference: Van Loan (2000). The ubiquitous Kronecker product.
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
    check_same_dtype_device,
    logdet_from_sign,
)
from curvops.structured._dense_linalg import invert_dense, is_symmetric
from curvops.structured._mode_product import mode_products
from curvops.structured.kronecker_eigen import KroneckerEigenLinearOperator


class KroneckerProductLinearOperator(LinearOperator):
    """The Kronecker product :math:`A_1 \\otimes \\cdots \\otimes A_k` (NOTE [Kronecker order]).

    The operator acts on ONE tensor of shape :math:`(n_1, \\dots, n_k)` (or ``in_shape``) with
    ``A_i`` of shape ``[m_i, n_i]``. Products are successive mode products, costing
    :math:`O(N \\sum_i n_i)` per column for square factors (:math:`N = \\prod_i n_i`); the dense
    Kronecker matrix is never formed. Closed forms (Van Loan, 2000):
    :math:`\\operatorname{tr} = \\prod_i \\operatorname{tr} A_i`,
    :math:`\\log\\det = \\sum_i (N / n_i) \\log\\det A_i`,
    :math:`\\|\\cdot\\|_F = \\prod_i \\|A_i\\|_F`.

    Examples:
        >>> import torch
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
        >>> B = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
        >>> K = KroneckerProductLinearOperator(A, B)
        >>> float(K.trace()), float(K.det()), K.shape
        (10.0, 36.0, (4, 4))
    """

    def __init__(
        self,
        *factors: Tensor,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        symmetric: bool | None = None,
        psd: bool = False,
    ):
        """Store the factors.

        Args:
            *factors: ``k >= 1`` floating-point matrices ``A_i`` of shape ``[m_i, n_i]``
                (same dtype and device).
            in_shape: Shape of the input tensor, with :math:`\\prod_i n_i` entries (e.g. a
                convolution weight's shape). Default: ``(n_1, ..., n_k)``.
            out_shape: Shape of the output tensor, with :math:`\\prod_i m_i` entries.
                Default: ``(m_1, ..., m_k)``, or ``in_shape`` for square factors.
            symmetric: Whether every factor is symmetric (sets ``is_self_adjoint``). ``None``
                checks each factor with ``torch.allclose(A_i, A_i.T)``.
            psd: Declare every factor positive semi-definite (sets ``is_psd``; not checked).

        Raises:
            TypeError: If a factor is not a floating-point tensor or the dtypes differ.
            ValueError: If no factor is given, a factor is not a matrix, devices differ, the
                shapes do not match the factors, or ``symmetric``/``psd`` cannot hold.
        """
        if len(factors) == 0:
            raise ValueError("Pass at least one Kronecker factor.")
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            raise TypeError(
                "Pass the factors as separate arguments, "
                "KroneckerProductLinearOperator(*factors), not as one list."
            )
        for i, A in enumerate(factors):
            check_floating_tensor(A, f"Kronecker factor {i}", ndim=2)
        check_same_dtype_device([(f"Kronecker factor {i}", A) for i, A in enumerate(factors)])
        self._in_sizes = tuple(A.shape[1] for A in factors)
        self._out_sizes = tuple(A.shape[0] for A in factors)
        self._square = self._in_sizes == self._out_sizes
        in_shape = self._in_sizes if in_shape is None else tuple(int(s) for s in in_shape)
        if out_shape is None:
            out_shape = in_shape if self._square else self._out_sizes
        out_shape = tuple(int(s) for s in out_shape)
        for name, shape, sizes in [
            ("in_shape", in_shape, self._in_sizes),
            ("out_shape", out_shape, self._out_sizes),
        ]:
            if prod(shape) != prod(sizes):
                raise ValueError(
                    f"{name} {shape} has {prod(shape)} entries, but the factors need "
                    f"{prod(sizes)} = prod{sizes}."
                )
        super().__init__([in_shape], [out_shape], dtype=factors[0].dtype, device=factors[0].device)
        self._factors = tuple(factors)

        can_be_symmetric = self._square and in_shape == out_shape
        if symmetric is None:
            symmetric = can_be_symmetric and all(is_symmetric(A) for A in factors)
        elif symmetric and not can_be_symmetric:
            raise ValueError(
                "symmetric=True requires square factors and in_shape == out_shape, got factor "
                f"shapes {[tuple(A.shape) for A in factors]}, in_shape {in_shape}, "
                f"out_shape {out_shape}."
            )
        if psd and not symmetric:
            raise ValueError("psd=True requires symmetric factors; also pass symmetric=True.")
        self.is_self_adjoint = bool(symmetric)
        self.is_psd = bool(psd)

    @property
    def factors(self) -> tuple[Tensor, ...]:
        """The Kronecker factors :math:`(A_1, \\dots, A_k)`."""
        return self._factors

    # ---------------------------------------------------------------- products
    def _apply(self, x: Tensor, matrices: Sequence[Tensor], in_sizes, out_shape) -> Tensor:
        num_cols = x.shape[-1]
        y = mode_products(x.reshape(*in_sizes, num_cols), matrices)
        return y.reshape(*out_shape, num_cols)

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return [self._apply(X[0], self._factors, self._in_sizes, self._out_shapes[0])]

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        transposed = [A.T for A in self._factors]
        return [self._apply(X[0], transposed, self._out_sizes, self._in_shapes[0])]

    def _like(self, factors, *, transpose: bool = False, psd: bool | None = None):
        in_shape, out_shape = self._in_shapes[0], self._out_shapes[0]
        if transpose:
            in_shape, out_shape = out_shape, in_shape
        return KroneckerProductLinearOperator(
            *factors,
            in_shape=in_shape,
            out_shape=out_shape,
            symmetric=self.is_self_adjoint,
            psd=self.is_psd if psd is None else psd,
        )

    def adjoint(self) -> KroneckerProductLinearOperator:
        """Return :math:`A_1^\\top \\otimes \\cdots \\otimes A_k^\\top`."""
        if self.is_self_adjoint:
            return self
        return self._like([A.T for A in self._factors], transpose=True)

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        factors = (scale * self._factors[0],) + self._factors[1:]
        return self._like(factors, psd=self.is_psd and scale >= 0)

    __rmul__ = __mul__

    def __neg__(self) -> KroneckerProductLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Form the dense matrix ``torch.kron(A_1, ..., A_k)`` (for small sizes)."""
        return reduce(torch.kron, [f.contiguous() for f in self._factors])

    # ---------------------------------------------------------------- closed forms
    def _require_square_factors(self, what: str) -> None:
        if not self._square:
            raise ValueError(
                f"{what} requires square Kronecker factors, got factor shapes "
                f"{[tuple(A.shape) for A in self._factors]}."
            )

    def trace(self) -> Tensor:
        """Trace :math:`\\prod_i \\operatorname{tr}(A_i)`."""
        self._require_square_factors("trace()")
        return torch.stack([A.diagonal().sum() for A in self._factors]).prod()

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`\\prod_i \\|A_i\\|_F`."""
        return torch.stack([torch.linalg.matrix_norm(A) for A in self._factors]).prod()

    def diagonal(self) -> Tensor:
        """Diagonal ``[N]`` (flat): the row-major outer product of the factor diagonals."""
        self._require_square_factors("diagonal()")
        diags = [A.diagonal() for A in self._factors]
        return reduce(lambda d, e: (d.unsqueeze(-1) * e).reshape(-1), diags)

    def _slogdet(self) -> tuple[float, Tensor]:
        """Sign and :math:`\\log|\\det|` via :math:`\\det = \\prod_i \\det(A_i)^{N / n_i}`."""
        N = prod(self._in_sizes)
        sign, logabsdet = 1.0, torch.zeros((), dtype=self.dtype, device=self.device)
        for A, n in zip(self._factors, self._in_sizes):
            s, la = torch.linalg.slogdet(A)
            power = N // n
            sign *= float(s) ** power
            logabsdet = logabsdet + power * la
        return sign, logabsdet

    def det(self) -> Tensor:
        """Determinant :math:`\\prod_i \\det(A_i)^{N / n_i}`."""
        self._require_square_factors("det()")
        sign, logabsdet = self._slogdet()
        return sign * logabsdet.exp()

    def logdet(self) -> Tensor:
        """Log-determinant :math:`\\sum_i (N / n_i) \\log \\det A_i`.

        See NOTE [log-determinant semantics] in ``curvops.structured._checks``.

        Raises:
            ValueError: If the determinant is negative.
        """
        self._require_square_factors("logdet()")
        sign, logabsdet = self._slogdet()
        return logdet_from_sign(torch.tensor(sign), logabsdet, "KroneckerProductLinearOperator")

    def inverse(
        self, damping: float = 0.0
    ) -> KroneckerProductLinearOperator | KroneckerEigenLinearOperator:
        """Return the exact :math:`(A_1 \\otimes \\cdots \\otimes A_k + \\delta I)^{-1}`.

        * :math:`\\delta = 0`: the Kronecker product of the factor inverses,
          :math:`A_1^{-1} \\otimes \\cdots \\otimes A_k^{-1}`.
        * :math:`\\delta > 0` (symmetric factors only): with eigendecompositions
          :math:`A_i = Q_i \\operatorname{diag}(\\lambda_i) Q_i^\\top`,
          :math:`\\otimes_i A_i + \\delta I = (\\otimes_i Q_i)
          \\operatorname{diag}(\\operatorname{vec}_r(\\lambda_1 \\circ \\cdots \\circ \\lambda_k)
          + \\delta) (\\otimes_i Q_i)^\\top`, returned as a
          :class:`KroneckerEigenLinearOperator` (Martens & Grosse (2015). Optimizing neural
          networks with Kronecker-factored approximate curvature; appendix on inverting
          :math:`A \\otimes B \\pm C \\otimes D`). For the cheaper
          factor-wise damping see :meth:`inverse_factor_damping`.

        Args:
            damping: :math:`\\delta \\geq 0`.

        Returns:
            The inverse operator.

        Raises:
            ValueError: If the factors are not square, not symmetric (for
                :math:`\\delta > 0`), or the damped matrix is singular.
        """
        self._require_square_factors("inverse()")
        damping = check_damping(damping)
        if damping == 0.0:
            return self.inverse_factor_damping([0.0] * len(self._factors))
        if not self.is_self_adjoint:
            raise ValueError(
                "inverse(damping > 0) uses eigendecompositions and requires symmetric factors "
                "(is_self_adjoint=False here). Use inverse_factor_damping(dampings) instead, "
                "or pass symmetric=True if the factors are symmetric."
            )
        eigvals, eigvecs = zip(*(torch.linalg.eigh(A) for A in self._factors))
        if self.is_psd:  # remove round-off below zero of PSD factors
            eigvals = [lam.clamp(min=0) for lam in eigvals]
        lam = reduce(lambda L, e: L.unsqueeze(-1) * e, eigvals)
        eig_op = KroneckerEigenLinearOperator(
            list(eigvecs), lam, shape=self._in_shapes[0], check_orthonormal=False
        )
        return eig_op.inverse(damping)

    def inverse_factor_damping(self, dampings: Sequence[float]) -> KroneckerProductLinearOperator:
        """Return :math:`\\otimes_i (A_i + \\delta_i I)^{-1}` (factor-wise damping).

        Each factor is factorized once (Cholesky for symmetric positive definite factors,
        LU otherwise). This is KFAC's factored Tikhonov damping (Martens & Grosse, 2015);
        unlike :meth:`inverse` it is not the inverse of :math:`\\otimes_i A_i + \\delta I`.

        Args:
            dampings: One damping :math:`\\delta_i \\geq 0` per factor.

        Returns:
            The inverse as a :class:`KroneckerProductLinearOperator`.

        Raises:
            ValueError: If the number of dampings is wrong, a damping is negative, or a
                damped factor is singular.
        """
        self._require_square_factors("inverse_factor_damping()")
        dampings = list(dampings)
        if len(dampings) != len(self._factors):
            raise ValueError(
                f"Got {len(dampings)} dampings for {len(self._factors)} Kronecker factors; "
                f"pass one damping per factor."
            )
        inverses = [
            invert_dense(
                A, check_damping(d), symmetric=self.is_self_adjoint, name=f"Kronecker factor {i}"
            )
            for i, (A, d) in enumerate(zip(self._factors, dampings))
        ]
        return self._like(inverses, transpose=True)
