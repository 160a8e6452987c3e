"""The (scaled) identity operator :math:`c I`."""

from __future__ import annotations

from collections.abc import Sequence
from math import isfinite, log, sqrt

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator
from curvops.structured._checks import as_scalar, check_damping, logdet_from_sign


class IdentityLinearOperator(LinearOperator):
    """The scaled identity :math:`c I` on tensor lists of the given shapes.

    ``scale`` makes :math:`c I` representable structurally, so that damping terms such as
    ``K + 0.1 * IdentityLinearOperator(...)`` keep closed forms for their parts.

    Examples:
        >>> import torch
        >>> eye = IdentityLinearOperator([(2, 3)], dtype=torch.float64, device="cpu")
        >>> float((0.5 * eye).trace()), float(eye.inverse(damping=1.0).diagonal()[0])
        (3.0, 0.5)
    """

    is_self_adjoint = True

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        scale: float = 1.0,
    ):
        """Store the shapes and the scale.

        Args:
            shapes: Shapes of the tensor list the operator acts on (input and output).
            dtype: Data type of the operator.
            device: Device of the operator.
            scale: The factor :math:`c`.

        Raises:
            TypeError: If ``scale`` is not a real number or ``dtype`` is not floating point.
            ValueError: If ``scale`` is not finite or ``shapes`` is malformed.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
        c = as_scalar(scale)
        if c is None:
            raise TypeError(f"scale must be a real number, got {type(scale).__name__}.")
        if not isfinite(c):
            raise ValueError(f"scale must be finite, got {scale}.")
        try:
            shapes = [tuple(int(s) for s in shape) for shape in shapes]
        except TypeError as err:
            raise ValueError(
                f"shapes must be a list of shapes (sequences of ints), got {shapes!r}."
            ) from err
        if any(s < 0 for shape in shapes for s in shape):
            raise ValueError(f"shapes contains a negative dimension: {shapes}.")
        super().__init__(shapes, shapes, dtype=dtype, device=device)
        self._scale = c
        self.is_psd = c >= 0

    @property
    def scale(self) -> float:
        """The factor :math:`c`."""
        return self._scale

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return [self._scale * x for x in X]

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        return IdentityLinearOperator(
            self._in_shapes, dtype=self.dtype, device=self.device, scale=scale * self._scale
        )

    __rmul__ = __mul__

    def __neg__(self) -> IdentityLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Form :math:`c I` (``[D, D]``)."""
        return self._scale * torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------- closed forms
    def _scalar(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=self.dtype, device=self.device)

    def trace(self) -> Tensor:
        """Trace :math:`c D`."""
        return self._scalar(self._scale * self.shape[0])

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`|c| \\sqrt{D}`."""
        return self._scalar(abs(self._scale) * sqrt(self.shape[0]))

    def diagonal(self) -> Tensor:
        """Diagonal ``[D]`` filled with :math:`c`."""
        return torch.full((self.shape[0],), self._scale, dtype=self.dtype, device=self.device)

    def det(self) -> Tensor:
        """Determinant :math:`c^D`."""
        return self._scalar(self._scale) ** self.shape[0]

    def logdet(self) -> Tensor:
        """Log-determinant :math:`D \\log c` (0 for the identity; NOTE [log-determinant semantics]).

        Raises:
            ValueError: If :math:`c^D < 0`.
        """
        D, c = self.shape[0], self._scale
        sign = 1.0 if D == 0 else (0.0 if c == 0 else (1.0 if c > 0 or D % 2 == 0 else -1.0))
        logabsdet = D * log(abs(c)) if c != 0 and D else 0.0
        return logdet_from_sign(
            torch.tensor(sign), self._scalar(logabsdet), "IdentityLinearOperator"
        )

    def inverse(self, damping: float = 0.0) -> IdentityLinearOperator:
        """Return :math:`(c I + \\delta I)^{-1} = \\frac{1}{c + \\delta} I`.

        Args:
            damping: :math:`\\delta \\geq 0`.

        Returns:
            The inverse as a scaled :class:`IdentityLinearOperator`.

        Raises:
            ValueError: If :math:`c + \\delta = 0`.
        """
        damping = check_damping(damping)
        if self._scale + damping == 0.0:
            raise ValueError(
                f"scale + damping = {self._scale} + {damping} = 0, so the operator is singular. "
                f"Pass a damping that makes scale + damping nonzero."
            )
        return IdentityLinearOperator(
            self._in_shapes,
            dtype=self.dtype,
            device=self.device,
            scale=1.0 / (self._scale + damping),
        )
