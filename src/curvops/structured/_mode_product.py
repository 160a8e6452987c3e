"""Successive mode products of a tensor with matrices (private).

See NOTE [Kronecker order] in :mod:`curvops.structured.kronecker`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def mode_products(X: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """Multiply matrix ``i`` onto mode ``i`` of ``X``, for every ``i``.

    Computes :math:`Y = X \\times_1 M_1 \\times_2 \\cdots \\times_k M_k`, i.e.

    .. math::
        Y_{a_1 \\dots a_k c} = \\sum_{j_1, \\dots, j_k}
        [M_1]_{a_1 j_1} \\cdots [M_k]_{a_k j_k} X_{j_1 \\dots j_k c},

    which is :math:`(M_1 \\otimes \\cdots \\otimes M_k)` applied to the row-major
    vectorization of every slice ``X[..., c]`` (Kolda, Bader (2009). Tensor decompositions
    and applications), without forming the Kronecker product.

    Args:
        X: Tensor ``[n_1, ..., n_k, K]`` (a trailing column axis).
        matrices: ``k`` matrices, ``M_i`` of shape ``[m_i, n_i]``.

    Returns:
        Tensor ``[m_1, ..., m_k, K]``.
    """
    for i, M in enumerate(matrices):
        X = torch.tensordot(M, X, dims=([1], [i])).movedim(0, i)
    return X
