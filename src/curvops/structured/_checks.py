"""Input validation shared by the structured operators (private).

Every function raises an error that says what was wrong and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import isfinite, prod
from numbers import Number

import torch
from torch import Tensor


def check_floating_tensor(t: object, what: str, *, ndim: int | None = None) -> Tensor:
    """Check that ``t`` is a floating-point tensor (of a given number of dimensions).

    Args:
        t: The object to check.
        what: Name of the argument, used in error messages.
        ndim: Required number of dimensions, or ``None`` for any.

    Returns:
        ``t`` itself.

    Raises:
        TypeError: If ``t`` is not a tensor or not floating point.
        ValueError: If ``t`` has the wrong number of dimensions.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(
            f"{what} has dtype {t.dtype}, but must be floating point. Convert it with "
            f"`.to(torch.float64)` (or another floating dtype)."
        )
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimension(s), got shape {tuple(t.shape)}.")
    return t


def check_same_dtype_device(tensors: Sequence[tuple[str, Tensor]]) -> None:
    """Check that named tensors share dtype and device.

    Args:
        tensors: Pairs ``(name, tensor)``; all are compared to the first one.

    Raises:
        TypeError: On a dtype mismatch.
        ValueError: On a device mismatch.
    """
    name0, t0 = tensors[0]
    for name, t in tensors[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype}, but {name0} has dtype {t0.dtype}. "
                f"Convert them to one dtype with `.to(dtype)`."
            )
        if t.device != t0.device:
            raise ValueError(
                f"{name} lives on device {t.device}, but {name0} lives on {t0.device}. "
                f"Move them to one device with `.to(device)`."
            )


def check_shapes_numel(shapes: Sequence[Sequence[int]], numel: int, what: str) -> list[tuple]:
    """Check that tensor shapes describe exactly ``numel`` entries.

    Args:
        shapes: The shapes.
        numel: Required total number of entries.
        what: Name of the argument and what it must match, for error messages.

    Returns:
        The shapes as a list of integer tuples.

    Raises:
        ValueError: If the shapes are malformed or their sizes do not add up to ``numel``.
    """
    try:
        out = [tuple(int(s) for s in shape) for shape in shapes]
    except TypeError as err:
        raise ValueError(
            f"{what} must be a list of shapes (sequences of ints), got {shapes!r}."
        ) from err
    if any(s < 0 for shape in out for s in shape):
        raise ValueError(f"{what} contains a negative dimension: {out}.")
    total = sum(prod(shape) for shape in out)
    if total != numel:
        raise ValueError(f"{what} {out} describe {total} entries, but {numel} are required.")
    return out


def check_damping(damping: object) -> float:
    """Check a damping value :math:`\\delta \\geq 0` and return it as a float.

    Args:
        damping: The damping.

    Returns:
        The damping as a Python float.

    Raises:
        TypeError: If ``damping`` is not a real number.
        ValueError: If ``damping`` is negative or not finite.
    """
    if isinstance(damping, bool) or not isinstance(damping, Number):
        raise TypeError(f"damping must be a real number, got {type(damping).__name__}.")
    value = float(damping)
    if not isfinite(value) or value < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping}.")
    return value


def as_scalar(c: object) -> float | None:
    """Interpret ``c`` as a scalar factor for ``c * A``.

    Args:
        c: A Python number or a one-element tensor.

    Returns:
        ``c`` as a float, or ``None`` if ``c`` is not a scalar type (so that the caller can
        return ``NotImplemented``).

    Raises:
        ValueError: If ``c`` is a tensor with more than one element.
    """
    if isinstance(c, bool):
        return None
    if isinstance(c, Tensor):
        if c.numel() != 1:
            raise ValueError(
                f"Only scalars can multiply a linear operator with `*`, got a tensor of shape "
                f"{tuple(c.shape)}."
            )
        return float(c)
    if isinstance(c, Number):
        return float(c)
    return None


def logdet_from_sign(sign: Tensor, logabsdet: Tensor, name: str) -> Tensor:
    """Turn a sign and a log-absolute-determinant into :math:`\\log\\det A`.

    NOTE [log-determinant semantics]: ``logdet()`` returns :math:`\\log \\det A` as a real
    number. It is :math:`-\\infty` for a singular matrix and undefined (an error) for a
    negative determinant, which cannot happen for a positive definite matrix.

    Args:
        sign: Sign of the determinant (``-1``, ``0`` or ``1``).
        logabsdet: :math:`\\log |\\det A|`.
        name: Name of the operator, for the error message.

    Returns:
        :math:`\\log \\det A` (``-inf`` if the matrix is singular).

    Raises:
        ValueError: If the determinant is negative.
    """
    if float(sign) < 0:
        raise ValueError(
            f"The determinant of the {name} is negative, so it is not positive definite and "
            f"has no real log-determinant. Use `det()` for the signed determinant."
        )
    if float(sign) == 0:
        return torch.full_like(logabsdet, float("-inf"))
    return logabsdet


def require_square(shape: tuple[int, int], name: str, what: str) -> None:
    """Raise if an operator is not square.

    Args:
        shape: Shape ``(D_out, D_in)`` of the operator.
        name: Name of the operator.
        what: Name of the requested quantity.

    Raises:
        ValueError: If ``D_out != D_in``.
    """
    if shape[0] != shape[1]:
        raise ValueError(f"{what} requires a square operator, but the {name} has shape {shape}.")


def check_orthonormal_columns(Q: Tensor, what: str) -> None:
    """Check :math:`Q^\\top Q = I` up to a dtype-dependent tolerance.

    The tolerance is :math:`10 \\sqrt{\\varepsilon}` with :math:`\\varepsilon` the machine
    precision, loose enough for eigenvectors from ``torch.linalg.eigh`` in single precision.

    Args:
        Q: Matrix ``[D, k]``.
        what: Name of the argument, for the error message.

    Raises:
        ValueError: If the columns are not orthonormal.
    """
    k = Q.shape[1]
    gram = Q.T @ Q
    err = float((gram - torch.eye(k, dtype=Q.dtype, device=Q.device)).abs().max()) if k else 0.0
    tol = 10 * torch.finfo(Q.dtype).eps ** 0.5
    if err > tol:
        raise ValueError(
            f"{what} must have orthonormal columns, but max |QᵀQ - I| = {err:.3g} > {tol:.3g}. "
            f"Orthonormalize them (e.g. `torch.linalg.qr`) or pass `check_orthonormal=False`."
        )
