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

Inside :func:`efficient_tangents` these calls (and LayerNorm and BatchNorm in eval mode,
whose native forward-mode rules are several times slower than needed) run through custom
autograd functions whose primal output and backward pass are computed exactly as PyTorch
does (the same kernels; the same tensors saved for the backward pass) and whose tangent is
the operation's bilinear or closed-form rule, skipping absent tangents and recording no
graph:

.. math::
    \dot y = \operatorname{op}(\dot x, W) + \operatorname{op}(x, \dot W) + \dot b
    \quad\text{for } y = \operatorname{op}(x, W) + b,\ \operatorname{op}\in\{\text{linear},
    \text{conv}\};

normalisation layers use the derivative of :math:`\hat x = (x - \mu)/\sigma`, attention the
NOTE [attention JVP] of :mod:`curvops.curvature.attention` (its fused backward is reached
through an inner autograd graph built in the forward pass, which saves what the native
operation saves).

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

from curvops.curvature.attention import attention_jvp, without_mha_fast_path


class _Rule:
    """An operation computed as PyTorch does, with its own tangent rule.

    ``forward(args) -> (out, saved, meta)``: the output, the tensors the backward pass needs
    and other context; ``backward(saved, meta, grad_out, needs) -> grads`` (one entry per
    argument); ``tangent(args, tangents, out, saved) -> Tensor``.
    """

    def __init__(self, forward, backward, tangent):
        self.forward = forward
        self.backward = backward
        self.tangent = tangent


class _WithRule(torch.autograd.Function):
    """Primal and backward as PyTorch computes them, tangent from the rule."""

    @staticmethod
    def forward(ctx, rule: _Rule, *args: Any) -> Tensor:
        ctx.set_materialize_grads(False)
        out, saved, meta = rule.forward(args)
        # NOTE [saving without tangents]: PyTorch's saved variables also keep the tangent of a
        # dual tensor (for forward-over-reverse), which would hold every tangent of the pass
        # until its end (twice the activation memory). The rules keep detached tensors (the
        # same storage) and check their versions themselves.
        saved = [t if t is None else t.detach() for t in saved]
        ctx.saved = (saved, [None if t is None else t._version for t in saved])
        ctx.rule, ctx.meta, ctx.num_args = rule, meta, len(args)
        ctx.for_tangent = ([a.detach() if isinstance(a, Tensor) else a for a in args], out.detach())
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None):
        if grad_out is None:
            return (None,) * (ctx.num_args + 1)
        saved, versions = ctx.saved
        if any(t is not None and t._version != v for t, v in zip(saved, versions)):
            raise RuntimeError(
                "A tensor needed for the backward pass of a curvature product was modified "
                "in place during the forward pass. Avoid in-place operations on activations."
            )
        needs = ctx.needs_input_grad[1:]
        return (None, *ctx.rule.backward(saved, ctx.meta, grad_out, needs))

    @staticmethod
    def jvp(ctx, _rule_tangent, *tangents: Tensor | None) -> Tensor:
        args, out = ctx.for_tangent
        ctx.for_tangent = None
        with torch.no_grad():  # tangents are never differentiated: record no graph
            return ctx.rule.tangent(args, list(tangents), out, ctx.saved[0])


class _AttentionWithRule(torch.autograd.Function):
    """SDPA: fused primal and backward through an inner graph, closed-form tangent."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa) -> Tensor:
        ctx.set_materialize_grads(False)
        options = {"attn_mask": attn_mask, "is_causal": is_causal, "enable_gqa": enable_gqa}
        if scale is not None:
            options["scale"] = scale
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inner = [t.detach().requires_grad_(r) for t, r in zip((q, k, v), needs)]
            out = F.scaled_dot_product_attention(*inner, **options)
        # the inner graph saves what the fused backward needs (inputs, output, statistics)
        ctx.inner = (inner, out) if any(needs) else None
        ctx.options = options
        result = out.detach()
        ctx.for_tangent = ([t.detach() for t in (q, k, v)], result.detach())
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None):
        if ctx.inner is None or grad_out is None:
            return (None,) * 7
        inner, out = ctx.inner
        ctx.inner = None
        wanted = [t for t in inner if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*[next(grads) if t.requires_grad else None for t in inner], None, None, None, None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        (q, k, v), out = ctx.for_tangent
        ctx.for_tangent = None
        with torch.no_grad():
            return attention_jvp(q, k, v, out, dq, dk, dv, **ctx.options)


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
def _linear_forward(args):
    x, w, b = args
    return F.linear(x, w, b), (x, w), b is not None


def _linear_backward(saved, has_bias, g, needs):
    x, w = saved
    gx = g.matmul(w) if needs[0] else None
    gw = gb = None
    if needs[1] or (has_bias and needs[2]):
        g2 = g.reshape(-1, g.shape[-1])
        gw = g2.T.mm(x.reshape(-1, x.shape[-1])) if needs[1] else None
        gb = g2.sum(0) if has_bias and needs[2] else None
    return gx, gw, gb


def _linear_tangent(args, tangents, out, saved):
    x, w = args[0], args[1]
    dx, dw, db = tangents
    if dw is not None:  # x dW^T + db in one fused product
        return _sum([F.linear(x, dw, db), None if dx is None else F.linear(dx, w)], out)
    return _sum([None if dx is None else F.linear(dx, w), db], out)


# ---------------------------------------------------------------- convolution
def _conv_rule(conv: Callable[..., Tensor]) -> _Rule:
    def forward(args):
        x, w, b, *options = args
        return conv(x, w, b, *options), (x, w), (b is not None, options)

    def backward(saved, meta, g, needs):
        (x, w), (has_bias, (stride, padding, dilation, groups)) = saved, meta
        nd = x.ndim - 2

        def full(value):
            return list(value) if isinstance(value, (list, tuple)) else [value] * nd

        gx, gw, gb = torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            [w.shape[0]] if has_bias else None,
            full(stride),
            full(padding),
            full(dilation),
            False,
            [0] * nd,
            groups,
            [needs[0], needs[1], has_bias and needs[2]],
        )
        return gx, gw, gb, None, None, None, None

    def tangent(args, tangents, out, saved):
        x, w, options = args[0], args[1], args[3:]
        dx, dw, db = tangents[:3]
        terms = [
            None if dx is None else conv(dx, w, None, *options),
            None if dw is None else conv(x, dw, None, *options),
        ]
        if db is not None:
            terms.append(db.reshape([-1] + [1] * (x.ndim - 2)))
        return _sum(terms, out)

    return _Rule(forward, backward, tangent)


# ---------------------------------------------------------------- normalisation
def _bn_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.ndim - 2)


def _batch_norm_forward(args):
    x, mean, var, weight, bias, _, momentum, eps = args
    out = F.batch_norm(x, mean, var, weight, bias, False, momentum, eps)
    return out, (x, mean, var, weight), (bias is not None, eps)


def _batch_norm_backward(saved, meta, g, needs):
    (x, mean, var, weight), (has_bias, eps) = saved, meta
    mask = [needs[0], weight is not None and needs[3], has_bias and needs[4]]
    if not any(mask):
        return (None,) * 8
    # PyTorch's own fused kernel (evaluation mode: the running statistics)
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        g, x, weight, mean, var, None, None, False, eps, mask
    )
    return gx, None, None, gw if mask[1] else None, gb if mask[2] else None, None, None, None


def _batch_norm_tangent(args, tangents, out, saved):
    r"""Tangent of :math:`y = (x - \mu) \sigma^{-1} w + b`, per-channel affine in each input.

    :math:`\dot y = \dot x \, w\sigma^{-1} + x \, \dot w \sigma^{-1}
    + (\dot b - \mu \dot w \sigma^{-1})`, in at most two fused passes.
    """
    x, mean, var, weight = args[:4]
    eps = args[7]
    dx, dw, db = tangents[0], tangents[3], tangents[4]
    shape = _bn_shape(x)
    inv_std = (var + eps).rsqrt()
    total = None
    if dw is not None:
        slope = inv_std * dw
        shift = -mean * slope if db is None else db - mean * slope
        total = torch.addcmul(shift.reshape(shape), x, slope.reshape(shape))
    elif db is not None and dx is not None:
        gain = inv_std if weight is None else weight * inv_std
        return torch.addcmul(db.reshape(shape), dx, gain.reshape(shape))
    elif db is not None:
        return db.reshape(shape).expand_as(out).clone()
    if dx is not None:
        gain = (inv_std if weight is None else weight * inv_std).reshape(shape)
        total = dx * gain if total is None else total.addcmul_(dx, gain)
    return torch.zeros_like(out) if total is None else total


def _layer_norm_forward(args):
    x, normalized_shape, weight, bias, eps = args
    out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    return out, (x, mean, rstd, weight, bias), list(normalized_shape)


def _layer_norm_backward(saved, normalized_shape, g, needs):
    x, mean, rstd, weight, bias = saved
    mask = [needs[0], weight is not None and needs[2], bias is not None and needs[3]]
    gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
        g, x, normalized_shape, mean, rstd, weight, bias, mask
    )
    return gx, None, gw, gb, None


def _layer_norm_tangent(args, tangents, out, saved):
    r"""Tangent of :math:`y = \hat x \odot w + b`, :math:`\hat x = (x - \mu) r`.

    The normalisation's Jacobian :math:`r (I - \frac{1}{d} 1 1^\top - \frac{1}{d} \hat x
    \hat x^\top)` (per row of :math:`d` features) is symmetric, so its product with
    :math:`\dot x` is PyTorch's fused layer-norm backward kernel (without affine
    parameters) applied to :math:`\dot x`; then :math:`\dot y = w \odot J\dot x + \hat x
    \odot \dot w + \dot b`.
    """
    x, normalized_shape, weight = args[0], args[1], args[2]
    _, mean, inv_std = saved[:3]
    dx, dw, db = tangents[0], tangents[2], tangents[3]
    total = None
    if dx is not None:
        total = torch.ops.aten.native_layer_norm_backward(
            dx, x, normalized_shape, mean, inv_std, None, None, [True, False, False]
        )[0]
        if weight is not None:
            total.mul_(weight)
    if dw is not None:
        x_hat = (x - mean).mul_(inv_std)
        total = x_hat.mul_(dw) if total is None else total.addcmul_(x_hat, dw)
    if db is not None:
        total = db.expand_as(out).clone() if total is None else total.add_(db)
    return torch.zeros_like(out) if total is None else total


# ---------------------------------------------------------------- activations, pooling
def _unary_rule(op: Callable[[Tensor], Tensor], kernel, extra: tuple, uses_output: bool) -> _Rule:
    """Elementwise :math:`y = f(x)`: backward and tangent both multiply by :math:`f'(x)`.

    ``kernel(u, saved, *extra)`` is PyTorch's own backward kernel of ``f`` (which receives
    the output or the input, as ``uses_output`` says).
    """

    def forward(args):
        out = op(args[0])
        return out, (out if uses_output else args[0],), len(args)

    def backward(saved, num_args, g, needs):
        return (kernel(g, saved[0], *extra) if needs[0] else None, *([None] * (num_args - 1)))

    def tangent(args, tangents, out, saved):
        return kernel(tangents[0], saved[0], *extra)

    return _Rule(forward, backward, tangent)


def _max_pool_forward(args):
    x, kernel, stride, padding, dilation, ceil_mode, _ = args
    stride = kernel if stride is None or stride == [] else stride
    options = (kernel, stride, padding, dilation, ceil_mode)
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, *options)
    return out, (x, indices), options


def _max_pool_backward(saved, options, g, needs):
    x, indices = saved
    gx = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *options, indices)
    return gx if needs[0] else None, None, None, None, None, None, None


def _max_pool_tangent(args, tangents, out, saved):
    _, indices = saved
    dx = tangents[0]
    flat = dx.flatten(start_dim=-2).gather(-1, indices.flatten(start_dim=-2))
    return flat.view(out.shape)


_UNARY = {
    F.relu: (torch.relu, torch.ops.aten.threshold_backward, True, (0,)),
    torch.relu: (torch.relu, torch.ops.aten.threshold_backward, True, (0,)),
    Tensor.relu: (torch.relu, torch.ops.aten.threshold_backward, True, (0,)),
    torch.tanh: (torch.tanh, torch.ops.aten.tanh_backward, True, ()),
    Tensor.tanh: (torch.tanh, torch.ops.aten.tanh_backward, True, ()),
    torch.sigmoid: (torch.sigmoid, torch.ops.aten.sigmoid_backward, True, ()),
    Tensor.sigmoid: (torch.sigmoid, torch.ops.aten.sigmoid_backward, True, ()),
    F.silu: (F.silu, torch.ops.aten.silu_backward, False, ()),
}
_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_RULES = {
    F.linear: _Rule(_linear_forward, _linear_backward, _linear_tangent),
    **{conv: _conv_rule(conv) for conv in (F.conv1d, F.conv2d, F.conv3d)},
    F.batch_norm: _Rule(_batch_norm_forward, _batch_norm_backward, _batch_norm_tangent),
    F.layer_norm: _Rule(_layer_norm_forward, _layer_norm_backward, _layer_norm_tangent),
    F.max_pool2d: _Rule(_max_pool_forward, _max_pool_backward, _max_pool_tangent),
    F.gelu: _Rule(
        lambda args: (F.gelu(args[0], approximate=args[1]), (args[0],), args[1]),
        lambda saved, meta, g, needs: (
            torch.ops.aten.gelu_backward(g, saved[0], approximate=meta) if needs[0] else None,
            None,
        ),
        lambda args, tangents, out, saved: torch.ops.aten.gelu_backward(
            tangents[0], saved[0], approximate=args[1]
        ),
    ),
    **{
        func: _unary_rule(op, kernel, extra, uses_output)
        for func, (op, kernel, uses_output, extra) in _UNARY.items()
    },
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
    F.max_pool2d: (
        ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
        (None, 0, 1, False, False),
    ),
    F.gelu: (("input", "approximate"), ("none",)),
    **{f: (("input", "inplace"), (False,)) for f in (F.relu, F.silu)},
    **{f: (("input",), ()) for f in (torch.relu, Tensor.relu, torch.tanh, Tensor.tanh)},
    **{f: (("input",), ()) for f in (torch.sigmoid, Tensor.sigmoid)},
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


def decomposed_weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    r"""``torch._weight_norm(v, g, dim)`` from primitives with forward-mode derivatives.

    NOTE [weight norm]: weight normalisation (``torch.nn.utils.weight_norm``,
    ``torch.nn.utils.parametrizations.weight_norm``) computes :math:`w = g\, v / \|v\|` with
    norms over all axes but ``dim``, through the fused ``_weight_norm_interface``, which has
    no forward-mode derivative in PyTorch (GGN, Fisher and Jacobian products failed with
    "Trying to use forward AD with _weight_norm_interface"), and whose double backward is
    wrong (torch 2.13: a reverse-over-reverse Hessian 0.28 away from central finite
    differences on a small MLP, silently). The same formula from ``norm_except_dim`` and
    elementwise operations has correct rules; the value is equal up to rounding. The
    forward-mode passes and the Hessian passes route ``torch._weight_norm`` here.
    """
    return v * (g / torch.norm_except_dim(v, 2, dim))


class _TangentRuleMode(TorchFunctionMode):
    """Routes linear, convolution, normalisation and SDPA calls through the custom rules."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:  # NOTE [weight norm]
            return decomposed_weight_norm(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            # this mode does not see the SDPA call inside (a torch function's handler runs
            # with the mode off): the math backend has native forward-mode rules (NOTE
            # [nn.MultiheadAttention] of curvops.curvature.attention)
            with sdpa_kernel([SDPBackend.MATH]):
                return func(*args, **kwargs)
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
            return _AttentionWithRule.apply(q, k, v, mask, is_causal, scale, gqa)
        if func is F.batch_norm and (bound[5] or _has_tangent(bound[1:3])):
            return func(*args, **kwargs)  # training mode, or statistics with tangents: native
        if func in _CONVS and (isinstance(bound[4], str) or bound[0].ndim != bound[1].ndim):
            return func(*args, **kwargs)  # padding="same"/"valid" or unbatched input: native
        if (func in (F.relu, F.silu) and bound[1]) or (func is F.max_pool2d and bound[6]):
            return func(*args, **kwargs)  # in place, or pooling indices requested: native
        return _WithRule.apply(_RULES[func], *bound)


@contextlib.contextmanager
def efficient_tangents() -> Iterator[None]:
    """Context for forward-mode passes that also record an autograd graph.

    Use inside ``torch.autograd.forward_ad.dual_level()``; not for ``torch.func`` transforms
    (their custom-function rules differ). See the module docstring.
    """
    with _TangentRuleMode(), without_mha_fast_path():
        yield
