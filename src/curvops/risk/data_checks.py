"""Checks of the data format and of dtypes against the parameters, with the fix in the message.

NOTE [data dtypes and devices]: floating-point data must have the parameters' dtype. PyTorch
itself fails deep inside the first layer ("mat1 and mat2 must have the same dtype"), or, for
some losses, silently computes in the lower precision (``BCEWithLogitsLoss`` with float64
outputs and float32 targets returns a float32 loss). So every batch's floating-point inputs
``X`` (a tensor or the tensors of a mapping) and, when there is a loss, floating-point
targets ``y`` are compared with the parameters' dtype before the batch is used, and the
loss module's own tensors (class ``weight``, ``pos_weight``) once at construction. Integer
data (class labels, token ids) are not compared. Devices need no check for data: every batch
is moved to the parameters' device (tensors and mappings of tensors); the loss module's
tensors are compared.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

_CONVERSIONS = {
    torch.float32: "float()",
    torch.float64: "double()",
    torch.float16: "half()",
    torch.bfloat16: "bfloat16()",
}


def _conversion(dtype: torch.dtype) -> str:
    """The method converting a tensor or module to ``dtype``, e.g. ``float()``."""
    return _CONVERSIONS.get(dtype, f"to({dtype})")


def check_data_container(data: Any) -> None:
    """Refuse ``data=(X, y)``, a single batch given where an iterable of batches belongs.

    Args:
        data: The ``data`` argument of an operator.

    Raises:
        ValueError: If ``data`` is a pair of tensors (or of a mapping and a tensor).
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, Mapping))
        and isinstance(data[1], Tensor)
    ):
        raise ValueError(
            f"data is one pair (X, y) ({type(data).__name__} of two tensors), but must be an "
            "iterable of (X, y) batches. Pass data=[(X, y)] for a single batch, or a "
            "torch DataLoader."
        )


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """Split a batch into ``(X, y)``.

    Args:
        batch: One element of the data.

    Returns:
        Inputs and targets.

    Raises:
        ValueError: If the batch is not a pair.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    hint = ""
    if isinstance(batch, Tensor):
        hint = " If you passed data=(X, y), pass data=[(X, y)] (a list of batches) instead."
    raise ValueError(
        f"Each batch must be a pair (X, y); got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "."
        + hint
    )


def _floating_tensors(x: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every floating-point tensor in ``x`` (tensor, mapping, sequence)."""
    if isinstance(x, Tensor):
        if x.is_floating_point():
            yield name, x
    elif isinstance(x, Mapping):
        for key, value in x.items():
            yield from _floating_tensors(value, f"{name}[{key!r}]")
    elif isinstance(x, (tuple, list)):
        for i, value in enumerate(x):
            yield from _floating_tensors(value, f"{name}[{i}]")


def check_batch_dtypes(X: Any, y: Any, dtype: torch.dtype, *, with_targets: bool) -> None:
    """Compare a batch's floating-point tensors with the parameters' dtype.

    See NOTE [data dtypes and devices].

    Args:
        X: The inputs.
        y: The targets.
        dtype: The parameters' dtype.
        with_targets: Whether the targets are used (there is a loss).

    Raises:
        TypeError: Naming the tensor, both dtypes and the conversion that fixes it.
    """
    for name, t in _floating_tensors(X, "X"):
        if t.dtype != dtype:
            raise TypeError(
                f"The data {name} has dtype {t.dtype}, but the parameters are {dtype}: convert "
                f"the data with {name}.{_conversion(dtype)} or the model with "
                f"model.{_conversion(t.dtype)}."
            )
    if not with_targets:
        return
    for name, t in _floating_tensors(y, "y"):
        if t.dtype != dtype:
            raise TypeError(
                f"The targets {name} have dtype {t.dtype}, but the parameters are {dtype}: "
                f"convert the targets with {name}.{_conversion(dtype)} (or the model and all "
                f"data with model.{_conversion(t.dtype)})."
            )


def check_loss_tensors(loss_func: nn.Module | None, dtype: torch.dtype, device: torch.device):
    """Compare the loss module's floating-point tensors (e.g. class weights) with the parameters.

    Args:
        loss_func: The loss module, or ``None``.
        dtype: The parameters' dtype.
        device: The parameters' device.

    Raises:
        TypeError: On a dtype mismatch, naming the tensor and the fix.
        ValueError: On a device mismatch, naming the tensor and the fix.
    """
    if loss_func is None:
        return
    owner = type(loss_func).__name__
    tensors = [*loss_func.named_buffers(), *loss_func.named_parameters()]
    for name, t in tensors:
        if not t.is_floating_point():
            continue
        if t.dtype != dtype:
            raise TypeError(
                f"The {owner}'s {name} has dtype {t.dtype}, but the parameters are {dtype}: "
                f"convert the loss with loss_func.{_conversion(dtype)}."
            )
        if t.device != device:
            raise ValueError(
                f"The {owner}'s {name} is on device {t.device}, but the parameters are on "
                f"{device}: move the loss with loss_func.to('{device}')."
            )
