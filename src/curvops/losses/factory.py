"""Building the loss specification of a loss module (:func:`make_loss_spec`)."""

from __future__ import annotations

from torch import nn

from curvops.losses.base import ClassIndexLossSpec, ElementwiseLossSpec, LossSpec
from curvops.losses.bce import BCEWithLogitsLossSpec
from curvops.losses.cross_entropy import CrossEntropyLossSpec
from curvops.losses.mse import MSELossSpec

# PyTorch losses whose "mean" divides by the number of entries
_ELEMENTWISE = (nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.SoftMarginLoss)


def _check_reduction(loss_func: nn.Module) -> str:
    reduction = getattr(loss_func, "reduction", None)
    if reduction is None:
        raise ValueError(
            f"{type(loss_func).__name__} has no `reduction` attribute. curvops needs to know "
            f"how the loss scales with the batch: set `loss_func.reduction = 'mean'` or 'sum'."
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_func).__name__} has reduction={reduction!r}; curvops needs a scalar "
            f"batch loss: use reduction='mean' or reduction='sum'."
        )
    return reduction


def _is_plain(loss_func: nn.Module, base: type) -> bool:
    """An instance of ``base`` (or a subclass keeping its ``forward``)."""
    return isinstance(loss_func, base) and type(loss_func).forward is base.forward


def make_loss_spec(loss_func: nn.Module) -> LossSpec:
    """Build the loss specification of a loss module.

    ``MSELoss``, ``CrossEntropyLoss`` and ``BCEWithLogitsLoss`` get a likelihood
    (:class:`~curvops.losses.likelihood.LikelihoodLossSpec`); other PyTorch losses with a known
    ``"mean"`` normaliser (element-wise losses, ``NLLLoss``) get it; any other loss is treated
    as a custom loss whose normaliser is the number of data (NOTE [loss scaling]). A subclass
    that overrides ``forward`` counts as a custom loss.

    Args:
        loss_func: A loss module with ``reduction`` ``"mean"`` or ``"sum"``.

    Returns:
        The loss specification.

    Raises:
        TypeError: If ``loss_func`` is not callable.
        ValueError: For ``reduction="none"`` or a missing reduction.
    """
    if not callable(loss_func):
        raise TypeError(f"loss_func must be a loss module, got {type(loss_func)}.")
    reduction = _check_reduction(loss_func)
    if _is_plain(loss_func, nn.CrossEntropyLoss):
        refusal = " with class weights" if loss_func.weight is not None else ""
        return CrossEntropyLossSpec(loss_func, reduction, refusal)
    if _is_plain(loss_func, nn.MSELoss):
        return MSELossSpec(loss_func, reduction)
    if _is_plain(loss_func, nn.BCEWithLogitsLoss):
        weighted = loss_func.weight is not None or loss_func.pos_weight is not None
        return BCEWithLogitsLossSpec(loss_func, reduction, " with weight/pos_weight" * weighted)
    if _is_plain(loss_func, nn.NLLLoss):
        return ClassIndexLossSpec(loss_func, reduction)
    if any(_is_plain(loss_func, base) for base in _ELEMENTWISE):
        return ElementwiseLossSpec(loss_func, reduction)
    supported = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)
    refusal = " (a subclass of a supported loss)" if isinstance(loss_func, supported) else ""
    return LossSpec(loss_func, reduction, refusal)
