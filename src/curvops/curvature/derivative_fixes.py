"""Functions whose PyTorch derivative rules are missing or wrong, rerouted through equal formulas.

The product passes of :mod:`curvops.curvature.products` run under
:func:`derivative_fixes`: fused weight norm, mean ``mse_loss`` and (in forward-over-reverse
Hessian passes only) SiLU, Mish and GroupNorm are evaluated from elementary operations, the
same functions with working first- and second-order derivatives (NOTE [weight norm],
NOTE [forward-mode mse_loss], NOTE [unfused layers]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvops.curvature.tangent_rules import decomposed_weight_norm

if TYPE_CHECKING:
    from curvops.curvature.products import ProductPlan


class ForwardModeFixes(TorchFunctionMode):
    """Route two functions without working derivative rules through equal formulas.

    ``torch._weight_norm``: NOTE [weight norm] of :mod:`curvops.curvature.tangent_rules`
    (no forward-mode rule, and a wrong double backward).
    ``F.mse_loss(..., reduction="mean")``: evaluated as the ``"sum"`` loss over its size.

    NOTE [forward-mode mse_loss]: PyTorch's forward-mode derivative of the backward of
    ``mse_loss`` with ``reduction="mean"`` raises "ZeroTensors are immutable" (torch 2.13), so
    forward-over-reverse Hessian products of any model or loss calling it (``nn.MSELoss()``)
    failed. ``"sum"`` has a working rule; the mean is that sum divided by the number of
    entries (of the broadcast shape), the same function, so the product is unchanged.
    Other calls (``weight``, the legacy ``size_average``/``reduce``) pass through.
    """

    def __init__(self, second_order_forward: bool = False):
        super().__init__()
        self.second_order_forward = second_order_forward
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch._weight_norm:
            self.used = True
            return decomposed_weight_norm(*args, **kwargs)
        if self.second_order_forward and func in _UNFUSED:  # NOTE [unfused layers]
            unfused = _UNFUSED[func](*args, **kwargs)
            if unfused is not None:
                self.used = True
                return unfused
        plain = all(kwargs.get(k) is None for k in ("size_average", "reduce", "weight"))
        if func is F.mse_loss and len(args) == 2 and plain:
            if kwargs.get("reduction", "mean") == "mean":
                self.used = True
                size = torch.broadcast_shapes(args[0].shape, args[1].shape).numel()
                return func(*args, reduction="sum") / size
        return func(*args, **kwargs)


def _unfused_silu(input: Tensor, inplace: bool = False) -> Tensor | None:
    return None if inplace else input * torch.sigmoid(input)


def _unfused_mish(input: Tensor, inplace: bool = False) -> Tensor | None:
    return None if inplace else input * torch.tanh(F.softplus(input))


def _unfused_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    x = input.reshape(input.shape[0], num_groups, -1)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    out = ((x - mean) / torch.sqrt(var + eps)).reshape(input.shape)
    affine_shape = (1, -1) + (1,) * (input.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(affine_shape)
    if bias is not None:
        out = out + bias.reshape(affine_shape)
    return out


_UNFUSED = {F.silu: _unfused_silu, F.mish: _unfused_mish, F.group_norm: _unfused_group_norm}
"""NOTE [unfused layers]: the fused backward kernels of SiLU, Mish and GroupNorm have no
forward-mode derivative (torch 2.13: "Trying to use forward AD with aten::silu_backward"), so
forward-over-reverse Hessian products evaluate these layers from elementary operations (the
same functions; ``None``: an in-place call, left to PyTorch). Only that pass reroutes them:
the other passes keep the fused kernels."""


@contextlib.contextmanager
def derivative_fixes(
    plan: ProductPlan | None, second_order_forward: bool = False
) -> Iterator[None]:
    """:class:`ForwardModeFixes` where needed.

    The mode costs Python dispatch on every operation (measured 5% of a Hessian-vector
    product of a small MLP), so it is dropped once the first successful pass of an
    operator (``plan``) has called neither function; without a plan it is always on.
    """
    if plan is not None and plan.derivative_fixes is False:
        yield
        return
    mode = ForwardModeFixes(second_order_forward)
    with mode:
        yield
    if plan is not None and plan.derivative_fixes is None:
        plan.derivative_fixes = mode.used
