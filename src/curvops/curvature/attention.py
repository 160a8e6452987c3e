r"""Curvature products through ``F.scaled_dot_product_attention`` (SDPA) with fused kernels.

PyTorch's fused attention kernels (flash / memory-efficient) implement neither forward-mode
autodiff nor double backward, so a Jacobian-vector product through a transformer fails unless
the slow "math" backend is forced. ``curvops`` does that work for the user:

* GGN, Fisher and Jacobian products (forward mode inside one autograd graph) keep PyTorch's
  fused kernels for the output and the backward pass (same speed and saved memory as in a
  training step) and get the tangent from :func:`attention_jvp`, the closed form below,
  evaluated in blocks of queries so that the :math:`T \times T` attention matrix never
  exists at once for long sequences (wired in by :mod:`curvops.curvature.tangent_rules`).
* Hessian products and ``torch.func`` transforms run under :func:`differentiable_attention`,
  which selects the math backend: it composes differentiable primitives (double backward,
  forward-over-reverse, ``vmap``).

NOTE [attention JVP]: with :math:`S = s\,QK^\top + M` (scale :math:`s`, additive mask
:math:`M`), :math:`P = \operatorname{softmax}(S)` row-wise and :math:`O = PV`, the tangent in
direction :math:`(\dot Q, \dot K, \dot V)` is

.. math::
    \dot S = s(\dot Q K^\top + Q \dot K^\top), \qquad
    \dot O = P \dot V + (P \odot \dot S) V - \operatorname{rowsum}(P \odot \dot S) \odot O,

using the softmax Jacobian :math:`\dot P = P \odot (\dot S - \operatorname{rowsum}(P \odot
\dot S))` (Vaswani, A., Shazeer, N., Parmar, N., et al. (2017). Attention is all you need,
for the attention; the JVP is standard calculus).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from math import sqrt

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Largest number of attention-matrix entries formed at once by the tangent (2**24 entries:
# 64 MiB in float32); queries are processed in blocks below that size.
_MAX_BLOCK_ENTRIES = 2**24


def _attention_bias(
    q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, rows: slice
) -> Tensor | None:
    """Additive bias of the query rows ``rows`` (``-inf`` where attention is masked)."""
    L, S = q.shape[-2], k.shape[-2]
    bias = None
    if is_causal:
        idx = torch.arange(L, device=q.device)[rows]
        allowed = idx.unsqueeze(-1) >= torch.arange(S, device=q.device)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))
    if attn_mask is not None:
        mask = attn_mask[..., rows, :] if attn_mask.shape[-2] == L else attn_mask
        if mask.dtype == torch.bool:
            extra = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            extra.masked_fill_(~mask, float("-inf"))
        else:
            extra = mask.to(q.dtype)
        bias = extra if bias is None else bias + extra
    return bias


def _repeat_kv(t: Tensor | None, groups: int) -> Tensor | None:
    return t if t is None or groups == 1 else t.repeat_interleave(groups, dim=-3)


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    r"""Tangent of SDPA's output (NOTE [attention JVP]), in blocks of queries.

    Args:
        q: Queries ``[..., L, E]``.
        k: Keys ``[..., S, E]``.
        v: Values ``[..., S, Ev]``.
        out: The attention output ``[..., L, Ev]`` at ``(q, k, v)``.
        dq: Tangent of ``q`` (``None``: zero).
        dk: Tangent of ``k`` (``None``: zero).
        dv: Tangent of ``v`` (``None``: zero).
        attn_mask: Boolean (``True`` = attend) or additive mask, broadcastable to
            ``[..., L, S]``.
        is_causal: Causal masking (queries attend to keys at positions up to their own).
        scale: Score scale :math:`s` (default :math:`1/\sqrt{E}`).
        enable_gqa: Grouped-query attention (keys and values have fewer heads).

    Returns:
        The tangent :math:`\dot O`, shaped like ``out``.
    """
    s = 1.0 / sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[-3] // k.shape[-3] if enable_gqa else 1
    k, v, dk, dv = (_repeat_kv(t, groups) for t in (k, v, dk, dv))
    L, S = q.shape[-2], k.shape[-2]
    per_row = max(1, q[..., 0, 0].numel() * S)
    block = max(1, min(L, _MAX_BLOCK_ENTRIES // per_row))
    kT = k.transpose(-2, -1)
    blocks = []
    for start in range(0, L, block):
        rows = slice(start, min(start + block, L))
        scores = q[..., rows, :] @ kT * s
        bias = _attention_bias(q, k, attn_mask, is_causal, rows)
        if bias is not None:
            scores = scores + bias
        P = scores.softmax(dim=-1)
        d_out = torch.zeros_like(out[..., rows, :]) if dv is None else P @ dv
        if dq is not None or dk is not None:
            dS = 0
            if dq is not None:
                dS = dq[..., rows, :] @ kT
            if dk is not None:
                dS = dS + q[..., rows, :] @ dk.transpose(-2, -1)
            PdS = P * (dS * s)
            d_out = d_out + PdS @ v - PdS.sum(dim=-1, keepdim=True) * out[..., rows, :]
        blocks.append(d_out)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)


@contextlib.contextmanager
def without_mha_fast_path() -> Iterator[None]:
    """Context in which ``nn.MultiheadAttention`` takes its differentiable path.

    NOTE [nn.MultiheadAttention]: in eval mode, ``nn.MultiheadAttention`` calls the fused
    ``torch._native_multi_head_attention`` whenever no argument requires grad, which is the
    case inside ``torch.func`` transforms; that kernel has no forward-mode derivative, so
    GGN, Fisher and Jacobian products failed with PyTorch's "Trying to use forward AD with
    aten::_native_multi_head_attention". Its composite path (``F.multi_head_attention_forward``,
    the same function) is differentiable, so the passes switch the fast path off
    (``torch.backends.mha``, a process-wide flag, restored on exit; the passes run one at a
    time, NOTE [threads]). ``F.multi_head_attention_forward`` itself runs SDPA in the math
    backend (:mod:`curvops.curvature.tangent_rules`).
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Context in which SDPA uses the math backend (double backward, ``torch.func``).

    ``nn.MultiheadAttention`` also avoids its fused fast path (NOTE [nn.MultiheadAttention]).
    """
    with sdpa_kernel([SDPBackend.MATH]), without_mha_fast_path():
        yield
