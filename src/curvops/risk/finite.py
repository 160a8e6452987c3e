"""The one check for NaN and Inf, shared by every operator (exact, KFAC, EKFAC, inverses).

NOTE [non-finite values]: a curvature matrix of a model or data with NaN or Inf entries is
meaningless, and silently returning ``nan`` would be a wrong number. Every operator therefore
checks what it computes (products, loss and gradient, Kronecker factors, eigenvalue
corrections, inverse factors) and raises :class:`FloatingPointError` with the message built
here, naming the operator and the quantity; inputs (the vectors multiplied) that contain
NaN or Inf raise a ``ValueError`` instead, because the operator is not at fault. Usual
causes are a NaN parameter after a diverged optimiser step, Inf in the data, ``log(0)``,
exploding activations, or overflow in float16/float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

_ADVICE = (
    "Check the parameters (e.g. NaN after a diverged optimiser step) and the data for "
    "non-finite values, look for log(0) or exploding activations, or compute in float64."
)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether all entries are finite; finite sums imply it (NaN and Inf propagate).

    One reduction per tensor and a single synchronisation for all of them (the checks run
    after every KFAC pass and product, where a synchronisation per tensor showed up in the
    time of small models; on the CPU, where nothing synchronises, the sums are added as
    Python floats, which takes fewer tensor operations); only if a sum is not finite (NaN,
    Inf, or an overflow of finite entries) are the tensors tested elementwise.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    if all(t.device.type == "cpu" for t in tensors):  # no synchronisation to save on the CPU
        # the sums as Python floats (float64 in any case): fewer tensor operations
        total = sum(abs(t.sum().item()) for t in tensors)
        if math.isfinite(total):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        s = t.sum()
        s = s.abs() if s.is_complex() else s
        groups.setdefault((s.device, s.dtype), []).append(s)
    if all(bool(torch.stack(sums).isfinite().all()) for sums in groups.values()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def non_finite_error(owner: str, what: str) -> FloatingPointError:
    """The error for a non-finite quantity (NOTE [non-finite values]).

    Args:
        owner: The operator (or function) that computed it, e.g. ``"KFACLinearOperator"``.
        what: The quantity, e.g. ``"the loss"`` or ``"the input factor of Linear '0'"``.

    Returns:
        The error, to be raised by the caller.
    """
    return FloatingPointError(f"{owner}: NaN or Inf in {what}. {_ADVICE}")


def require_finite(tensors: Iterable[Tensor], *, owner: str, what: str) -> None:
    """Raise :func:`non_finite_error` if any entry of ``tensors`` is NaN or Inf.

    Args:
        tensors: The tensors to check.
        owner: The operator that computed them.
        what: What they are, for the message.

    Raises:
        FloatingPointError: If an entry is not finite.
    """
    if not all_finite(tensors):
        raise non_finite_error(owner, what)


def require_finite_input(tensors: Iterable[Tensor], *, owner: str) -> None:
    """Raise a ``ValueError`` if a vector given to ``owner`` contains NaN or Inf.

    Args:
        tensors: The input (a tensor list).
        owner: The operator multiplying it.

    Raises:
        ValueError: If an entry is not finite.
    """
    if not all_finite(tensors):
        raise ValueError(
            f"The input to {owner} contains NaN or Inf entries; multiply finite vectors only."
        )
