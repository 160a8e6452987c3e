"""Input validation shared by the matrix-free linear algebra routines (private).

Every routine in :mod:`curvops.linalg` accepts either a :class:`~curvops.LinearOperator` or a
plain dense ``torch.Tensor`` matrix; :func:`as_linear_operator` turns the latter into a
:class:`~curvops.structured.TensorLinearOperator`. All other helpers raise errors that say what
was wrong and how to fix it.
"""

from __future__ import annotations

from enum import Enum
from numbers import Real

from torch import Tensor

from curvops._integer_options import check_positive_int
from curvops.linear_operator import LinearOperator
from curvops.structured import TensorLinearOperator

__all__ = [
    "as_linear_operator",
    "check_positive_float",
    "check_positive_int",
    "parse_enum",
    "require_self_adjoint",
    "require_square",
]


def as_linear_operator(A: object, what: str = "A") -> LinearOperator:
    """Return ``A`` as a linear operator, wrapping a dense matrix if necessary.

    Args:
        A: A :class:`~curvops.LinearOperator`, or a floating-point matrix ``[D_out, D_in]``
            (wrapped in a :class:`~curvops.structured.TensorLinearOperator`, which detects
            symmetry itself).
        what: Name of the argument, used in error messages.

    Returns:
        The linear operator.

    Raises:
        TypeError: If ``A`` is neither a linear operator nor a tensor.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return TensorLinearOperator(A)
    raise TypeError(
        f"{what} must be a curvops.LinearOperator or a dense torch.Tensor matrix, got "
        f"{type(A).__name__}."
    )


def require_square(A: LinearOperator, routine: str) -> int:
    """Check that an operator is square and return its dimension.

    Args:
        A: The operator.
        routine: Name of the calling routine, used in the error message.

    Returns:
        The dimension :math:`D` of the square operator.

    Raises:
        ValueError: If ``A`` is not square.
    """
    d_out, d_in = A.shape
    if d_out != d_in:
        raise ValueError(
            f"{routine} requires a square operator, but got shape {A.shape}. For a "
            f"rectangular A, apply it to A.T @ A or A @ A.T instead."
        )
    return d_in


def require_self_adjoint(A: LinearOperator, routine: str, advice: str) -> None:
    """Check that an operator is self-adjoint (symmetric).

    Args:
        A: The operator.
        routine: Name of the calling routine, used in the error message.
        advice: What to do instead, appended to the error message.

    Raises:
        ValueError: If ``A.is_self_adjoint`` is false.
    """
    if not A.is_self_adjoint:
        raise ValueError(
            f"{routine} requires a symmetric operator (A.is_self_adjoint is False for "
            f"{type(A).__name__}). {advice}"
        )


def check_positive_float(value: object, what: str, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a real number ``> 0`` (or ``>= 0``).

    Args:
        value: The value to check.
        what: Name of the argument, used in error messages.
        allow_zero: Whether zero is allowed.

    Returns:
        The value as a Python ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is negative (or zero when not allowed) or not finite.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}.")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value}.")
    return value


def parse_enum(value: object, enum: type[Enum], what: str) -> Enum:
    """Convert a string option into a member of a string enum.

    Args:
        value: The option (a string or an enum member).
        enum: The string enum class.
        what: Name of the argument, used in error messages.

    Returns:
        The enum member.

    Raises:
        ValueError: If ``value`` names no member.
    """
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Unknown {what} {value!r}. Use one of {allowed}.") from None
