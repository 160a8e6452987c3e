"""A diagonal operator :math:`\\operatorname{diag}(d)`, optionally shaped like parameters."""

from __future__ import annotations

from collections.abc import Sequence

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


class DiagonalLinearOperator(LinearOperator):
    """The diagonal matrix :math:`\\operatorname{diag}(d)`; products are :math:`d \\odot v`.

    The diagonal is a flat tensor ``[D]`` (shapes ``[(D,)]``) or a tensor list whose entries
    give the shapes (e.g. a diagonal curvature approximation shaped like a model's
    parameters). :meth:`diagonal` and :meth:`inverse` keep the format it was given in.

    Examples:
        >>> import torch
        >>> A = DiagonalLinearOperator(torch.tensor([1.0, 2.0, 4.0]))
        >>> float(A.det()), A.inverse().diagonal().tolist()
        (8.0, [1.0, 0.5, 0.25])
    """

    is_self_adjoint = True

    def __init__(self, diagonal: Tensor | Sequence[Tensor]):
        """Store the diagonal.

        Args:
            diagonal: A flat floating-point tensor ``[D]``, or a non-empty list of
                floating-point tensors (same dtype and device) shaped like the tensor list the
                operator acts on.

        Raises:
            TypeError: If an entry is not a floating-point tensor or the dtypes differ.
            ValueError: If a flat diagonal is not 1-D, the list is empty, or devices differ.
        """
        if isinstance(diagonal, Tensor):
            if diagonal.ndim != 1:
                raise ValueError(
                    f"A flat diagonal must be 1-D, got shape {tuple(diagonal.shape)}. For a "
                    f"diagonal shaped like a tensor t, pass the list [t]."
                )
            entries = [check_floating_tensor(diagonal, "diagonal")]
            self._is_flat = True
        elif isinstance(diagonal, (list, tuple)):
            if len(diagonal) == 0:
                raise ValueError("The diagonal tensor list is empty; pass at least one tensor.")
            entries = [check_floating_tensor(d, f"diagonal[{i}]") for i, d in enumerate(diagonal)]
            check_same_dtype_device([(f"diagonal[{i}]", d) for i, d in enumerate(entries)])
            self._is_flat = False
        else:
            raise TypeError(
                f"diagonal must be a tensor or a list of tensors, got {type(diagonal).__name__}."
            )
        shapes = [tuple(d.shape) for d in entries]
        super().__init__(shapes, shapes, dtype=entries[0].dtype, device=entries[0].device)
        self._entries = entries
        self.is_psd = all(bool((d >= 0).all()) for d in entries)

    def _new(self, entries: list[Tensor]) -> DiagonalLinearOperator:
        return DiagonalLinearOperator(entries[0] if self._is_flat else entries)

    def _flat(self) -> Tensor:
        return torch.cat([d.reshape(-1) for d in self._entries])

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return [d.unsqueeze(-1) * x for d, x in zip(self._entries, X)]

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        return self._new([scale * d for d in self._entries])

    __rmul__ = __mul__

    def __neg__(self) -> DiagonalLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Form :math:`\\operatorname{diag}(d)` (``[D, D]``)."""
        return torch.diag(self._flat())

    # ---------------------------------------------------------------- closed forms
    def diagonal(self) -> Tensor | list[Tensor]:
        """The diagonal, in the format it was given (flat tensor or tensor list); a copy."""
        entries = [d.clone() for d in self._entries]
        return entries[0] if self._is_flat else entries

    def trace(self) -> Tensor:
        """Trace :math:`\\sum_i d_i`."""
        return self._flat().sum()

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`(\\sum_i d_i^2)^{1/2}`."""
        return torch.linalg.vector_norm(self._flat())

    def det(self) -> Tensor:
        """Determinant :math:`\\prod_i d_i`."""
        return self._flat().prod()

    def logdet(self) -> Tensor:
        """Log-determinant :math:`\\sum_i \\log d_i` (NOTE [log-determinant semantics]).

        Raises:
            ValueError: If :math:`\\prod_i d_i < 0`.
        """
        d = self._flat()
        sign = torch.tensor(0.0 if bool((d == 0).any()) else (-1.0) ** int((d < 0).sum()))
        return logdet_from_sign(sign, d.abs().log().sum(), "DiagonalLinearOperator")

    def inverse(self, damping: float = 0.0) -> DiagonalLinearOperator:
        """Return :math:`\\operatorname{diag}(1 / (d + \\delta))` in the same format.

        Args:
            damping: :math:`\\delta \\geq 0`.

        Returns:
            The inverse as a :class:`DiagonalLinearOperator`.

        Raises:
            ValueError: If an entry of :math:`d + \\delta` is zero.
        """
        damping = check_damping(damping)
        shifted = [d + damping for d in self._entries]
        if any(bool((s == 0).any()) for s in shifted):
            raise ValueError(
                f"A diagonal entry plus damping {damping} is zero, so the operator is singular. "
                f"Pass a damping that makes every entry nonzero."
            )
        return self._new([1.0 / s for s in shifted])
