r"""Fast forward-mode rules for linear, convolution and attention layers.

The GGN, Fisher and Jacobian products push a tangent :math:`v` through the network with
``torch.autograd.forward_ad`` while recording the autograd graph (NOTE [product passes] of
:mod:`curvops.curvature.products`). For three operations PyTorch's own forward-mode rules
are slow or missing (torch 2.13, CPU):

* ``F.linear`` whose input has no tangent (a network's first layer) also multiplies a
  materialised zero tangent of the input with the weight, one wasted matrix product;
* ``F.conv1d/2d/3d`` takes about 2.5 convolutions for the tangent instead of one (two with an
  input tangent);
* ``F.scaled_dot_product_attention`` has no forward-mode rule for its fused kernels.

Inside :func:`efficient_tangents` these calls run through :class:`_WithTangentRule`: the
primal output and the backward pass are PyTorch's own (an inner autograd graph built in the
forward pass and differentiated in the backward pass, so the memory saved for the backward
is exactly what the native operation saves), and the tangent is the operation's bilinear
(or closed-form, NOTE [attention JVP] of :mod:`curvops.curvature.attention`) rule, skipping
absent tangents:

.. math::
    \dot y = \operatorname{op}(\dot x, W) + \operatorname{op}(x, \dot W) + \dot b
    \quad\text{for } y = \operatorname{op}(x, W) + b,\ \operatorname{op}\in\{\text{linear},
    \text{conv}\}.

The backward pass of these nodes is not differentiable again (``once_differentiable``): the
rules serve first-order passes only; Hessian products use PyTorch's native rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from curvops.curvature.attention import attention_jvp


class _Rule:
    """An operation's primal function and its tangent rule on ``(args, tangents, out)``."""

    def __init__(self, primal: Callable[..., Tensor], tangent: Callable[..., Tensor]):
        self.primal = primal
        self.tangent = tangent


class _WithTangentRule(torch.autograd.Function):
    """Native primal and backward (through an inner graph), custom tangent rule."""

    @staticmethod
    def forward(ctx, rule: _Rule, *args: Any) -> Tensor:
        ctx.set_materialize_grads(False)
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            inner = [
                a.detach().requires_grad_(r) if isinstance(a, Tensor) else a
                for a, r in zip(args, needs)
            ]
            out = rule.primal(*inner)
        ctx.inner = (inner, out) if any(needs) else None
        ctx.rule = rule
        ctx.positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.others = list(args)
        out = out.detach()
        ctx.save_for_forward(*[args[i] for i in ctx.positions], out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None):
        none = (None,) * (len(ctx.others) + 1)
        if ctx.inner is None or grad_out is None:
            return none
        inner, out = ctx.inner
        ctx.inner = None
        wanted = [i for i, a in enumerate(inner) if isinstance(a, Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out, [inner[i] for i in wanted], grad_out, allow_unused=True)
        result = [None] * len(inner)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, *result)

    @staticmethod
    def jvp(ctx, _rule_tangent, *tangents: Tensor | None) -> Tensor:
        args = list(ctx.others)
        *saved, out = ctx.saved_tensors
        for i, t in zip(ctx.positions, saved):
            args[i] = t
        with torch.no_grad():  # tangents are never differentiated: record no graph
            return ctx.rule.tangent(args, list(tangents), out)


def _sum(terms: list[Tensor | None], out: Tensor) -> Tensor:
    """Sum of the present terms, shaped like ``out``, accumulated into a fresh tensor."""
    present = [t for t in terms if t is not None]
    if not present or present[0].shape != out.shape:
        total = torch.zeros_like(out)
    else:
        total, present = present[0], present[1:]  # the first term is always a fresh tensor
    for t in present:
        total.add_(t)
    return total


# ---------------------------------------------------------------- linear
def _linear(x, w, b=None):
    return F.linear(x, w, b)


def _linear_tangent(args, tangents, out):
    x, w = args[0], args[1]
    dx, dw = tangents[0], tangents[1]
    db = tangents[2] if len(tangents) > 2 else None
    if dw is not None:  # x dW^T + db in one fused product
        return _sum([F.linear(x, dw, db), None if dx is None else F.linear(dx, w)], out)
    return _sum([None if dx is None else F.linear(dx, w), db], out)


# ---------------------------------------------------------------- convolution
def _conv_rule(conv: Callable[..., Tensor]) -> _Rule:
    def primal(x, w, b=None, *options):
        return conv(x, w, b, *options)

    def tangent(args, tangents, out):
        x, w, options = args[0], args[1], args[3:]
        dx, dw = tangents[0], tangents[1]
        db = tangents[2] if len(tangents) > 2 else None
        out_shape = [1] * (x.ndim - 1)
        terms = [
            None if dx is None else conv(dx, w, None, *options),
            None if dw is None else conv(x, dw, None, *options),
        ]
        if db is not None:
            out_shape[0] = -1
            terms.append(db.reshape(out_shape))
        return _sum(terms, out)

    return _Rule(primal, tangent)


# ---------------------------------------------------------------- normalisation
def _batch_norm_eval(x, mean, var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return F.batch_norm(x, mean, var, weight, bias, training, momentum, eps)


def _batch_norm_eval_tangent(args, tangents, out):
    x, mean, var, weight = args[:4]
    eps = args[7] if len(args) > 7 else 1e-5
    dx, dw = tangents[0], tangents[3] if len(tangents) > 3 else None
    db = tangents[4] if len(tangents) > 4 else None
    shape = [1, -1] + [1] * (x.ndim - 2)
    inv_std = (var + eps).rsqrt()
    gain = inv_std if weight is None else weight * inv_std
    terms = [None if dx is None else dx * gain.reshape(shape)]
    if dw is not None:
        terms.append((x - mean.reshape(shape)) * (inv_std * dw).reshape(shape))
    if db is not None:
        terms.append(db.reshape(shape))
    return _sum(terms, out)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _layer_norm_tangent(args, tangents, out):
    x, normalized_shape, weight = args[0], args[1], args[2] if len(args) > 2 else None
    eps = args[4] if len(args) > 4 else 1e-5
    dx = tangents[0]
    dw = tangents[2] if len(tangents) > 2 else None
    db = tangents[3] if len(tangents) > 3 else None
    dims = tuple(range(-len(normalized_shape), 0))
    x_hat, _, inv_std = torch.native_layer_norm(x, normalized_shape, None, None, eps)
    terms = []
    if dx is not None:
        # (dx - mean(dx) - x_hat mean(dx x_hat)) / std, times the weight
        d_hat = dx - dx.mean(dim=dims, keepdim=True)
        d_hat.sub_(x_hat * (dx * x_hat).mean(dim=dims, keepdim=True)).mul_(inv_std)
        terms.append(d_hat if weight is None else d_hat.mul_(weight))
    if dw is not None:
        terms.append(x_hat * dw)
    if db is not None:
        terms.append(db)
    return _sum(terms, out)


# ---------------------------------------------------------------- attention
def _attention(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    options = {"attn_mask": attn_mask, "is_causal": is_causal, "enable_gqa": enable_gqa}
    if scale is not None:
        options["scale"] = scale
    return F.scaled_dot_product_attention(q, k, v, **options)


def _attention_tangent(args, tangents, out):
    q, k, v, attn_mask, is_causal, scale, enable_gqa = args
    return attention_jvp(
        q,
        k,
        v,
        out,
        *tangents[:3],
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


_ATTENTION = _Rule(_attention, _attention_tangent)
_RULES = {
    F.linear: _Rule(_linear, _linear_tangent),
    **{conv: _conv_rule(conv) for conv in (F.conv1d, F.conv2d, F.conv3d)},
    F.batch_norm: _Rule(_batch_norm_eval, _batch_norm_eval_tangent),
    F.layer_norm: _Rule(_layer_norm, _layer_norm_tangent),
}


def _has_tangent(args) -> bool:
    return any(isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


_PARAMETERS = {
    F.linear: (("input", "weight", "bias"), (None,)),
    **{
        conv: (
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            (None, 1, 0, 1, 1),
        )
        for conv in (F.conv1d, F.conv2d, F.conv3d)
    },
    F.batch_norm: (
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        (None, None, False, 0.1, 1e-5),
    ),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5)),
    F.scaled_dot_product_attention: (
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        (None, 0.0, False, None, False),
    ),
}


def _bind(func, args, kwargs) -> list | None:
    """All arguments of a known function in order (defaults filled), ``None`` if unknown."""
    names, defaults = _PARAMETERS[func]
    if len(args) > len(names):
        return None
    values = dict(zip(names[len(names) - len(defaults) :], defaults))
    values.update(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            return None
        values[key] = value
    if any(n not in values for n in names):
        return None
    return [values[n] for n in names]


class _TangentRuleMode(TorchFunctionMode):
    """Routes linear, convolution, normalisation and SDPA calls through the custom rules."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bound = _bind(func, args, kwargs) if func in _PARAMETERS else None
        if bound is None or not _has_tangent(bound):
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, dropout_p, is_causal, scale, gqa = bound
            if dropout_p != 0.0:
                raise NotImplementedError(
                    f"scaled_dot_product_attention with dropout_p={dropout_p} makes the model "
                    "stochastic, so its curvature is not a fixed matrix. Call model.eval() or "
                    "pass dropout_p=0.0 when not training."
                )
            if mask is not None and (mask.requires_grad or _has_tangent([mask])):
                # a learned additive mask: differentiable primitives (native rules)
                with sdpa_kernel([SDPBackend.MATH]):
                    return func(*args, **kwargs)
            return _WithTangentRule.apply(_ATTENTION, q, k, v, mask, is_causal, scale, gqa)
        if func is F.batch_norm and (bound[5] or _has_tangent(bound[1:3])):
            return func(*args, **kwargs)  # training mode, or statistics with tangents: native
        return _WithTangentRule.apply(_RULES[func], *bound)


@contextlib.contextmanager
def efficient_tangents() -> Iterator[None]:
    """Context for forward-mode passes that also record an autograd graph.

    Use inside ``torch.autograd.forward_ad.dual_level()``; not for ``torch.func`` transforms
    (their custom-function rules differ). See the module docstring.
    """
    with _TangentRuleMode():
        yield
