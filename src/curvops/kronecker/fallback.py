r"""Per-datum gradients for parameters that no supported layer owns (the fallback).

For parameters of layers KFAC has no Kronecker structure for (``LayerNorm``, ``BatchNorm`` in
eval mode, raw ``nn.Parameter`` s used in a ``forward``), ``fallback="diagonal"`` uses the
exact diagonal of the same curvature matrix,

.. math::
    \operatorname{diag}(C)_i = \sum_\mathbb{B} w_\mathbb{B} \sum_{n \in \mathbb{B}} \sum_k
    \left[J_{\theta} f_n^\top s_k[n]\right]_i^2,

where :math:`s_k[n]` are the per-datum output factors of the same curvature
(:meth:`curvops.losses.LikelihoodLossSpec.output_factors`): for ``type-2`` (and for
``empirical`` with ``kfac_approx="expand"``) split into one factor per output position, so
that the diagonal is the exact one of the GGN (of the empirical Fisher per loss term), see
NOTE [KFAC scaling] of :mod:`curvops.kronecker.factors`. The per-datum vector-Jacobian products
are computed with ``torch.func``: ``vjp`` for one datum, ``vmap`` over data and factors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.func import vjp, vmap


def per_datum_vjps(
    forward: Callable[[list[Tensor], Any], Tensor],
    values: list[Tensor],
    indices: list[int],
    X: Any,
    S: Tensor,
) -> list[Tensor]:
    """Per-datum vector-Jacobian products w.r.t. a subset of the parameters.

    Args:
        forward: ``forward(param_values, X) -> output`` (the data loop's functional model).
        values: Detached values of all parameters.
        indices: Positions (in ``values``) of the parameters to differentiate.
        X: The input batch (a tensor or a mapping of tensors, leading axis indexes data).
        S: Output factors ``[K, N, *output.shape[1:]]``.

    Returns:
        One tensor ``[K, N, *param.shape]`` per entry of ``indices``: the gradient of
        :math:`s_k[n]^\\top f_n` w.r.t. the parameter, for every factor ``k`` and datum ``n``.
    """

    def datum_output(sub_values: tuple[Tensor, ...], x_n: Any) -> Tensor:
        full = list(values)
        for i, v in zip(indices, sub_values):
            full[i] = v
        x_batch = _with_batch_axis(x_n)
        return forward(full, x_batch).squeeze(0)

    def datum_vjps(x_n: Any, s_n: Tensor) -> tuple[Tensor, ...]:
        sub = tuple(values[i] for i in indices)
        _, vjp_fn = vjp(lambda *p: datum_output(p, x_n), *sub)
        return vmap(vjp_fn)(s_n)

    grads = vmap(datum_vjps, in_dims=(0, 1))(X, S)  # each [N, K, *shape]
    return [g.transpose(0, 1) for g in grads]


def _with_batch_axis(x: Any) -> Any:
    """Give a datum (a tensor, or a mapping of tensors) a leading batch axis of size 1."""
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: _with_batch_axis(v) for k, v in x.items()}
    return x
