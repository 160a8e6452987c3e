r"""Gram matrices of row collections, accumulated in place by block-triangular products.

Both Kronecker factors are sums of outer products of rows,
:math:`\sum_r z_r z_r^\top = Z^\top Z` for the rows :math:`z_r` of a matrix
:math:`Z \in \mathbb{R}^{R \times d}` (input rows for :math:`A`, gradient rows for :math:`B`;
NOTE [KFAC scaling] of :mod:`curvops.kronecker.factors`).

NOTE [upper-triangular Gram sums]: the sum is symmetric, so only its upper triangle is
accumulated: the columns are split into panels of :data:`PANEL` and panel :math:`i` adds
:math:`Z_{:, i}^\top Z_{:, i:}` (its diagonal block and everything to its right) with one
in-place ``addmm``. With :math:`p` panels this costs :math:`(p + 1) / (2p)` of the
multiply-adds of :math:`Z^\top Z`, and the narrow output panels are also faster per
multiply-add on a CPU (PyTorch has no symmetric rank-k update). Blocks left of the diagonal
blocks stay untouched; :func:`mirror_upper_` copies them from the blocks right of the
diagonal once, after the last batch.

The rows arrive as a tensor ``[..., d]`` in one of two memory layouts, and the products are
taken in the layout they are stored in, so no operand is copied more than once:

* *row-major* rows (a linear layer's inputs ``[N, *, d]``, its output gradients): ``Z`` is a
  view ``[R, d]``;
* *feature-major* rows (unfolded convolution patches, stored ``[d, N P]`` by
  :func:`curvops.kronecker.unfold.unfold_conv_input`; convolution output gradients
  ``[K, N, C, P]``): :math:`Z^\top` is formed as ``[d, R]`` (a view for the patches, one copy
  for the gradients).

NOTE [Gram sums of per-datum blocks]: rows stored as per-datum blocks ``[B, d, P]`` with
:math:`P \geq d` (convolution output gradients with many output positions) are summed as
:math:`\sum_b G_b G_b^\top` by batched products, in chunks, instead of copying them into one
``[d, B P]`` matrix: on a CPU the copy of such a transposed layout costs more than the
products (measured 1.2-2.3x faster for ``d`` = 16-64, ``P`` = 64-1024, ``B`` = 640).
"""

from __future__ import annotations

import torch
from torch import Tensor

PANEL = 128
"""Width of the column panels of NOTE [upper-triangular Gram sums]."""

BLOCK_CHUNK_ELEMENTS = 2**22
"""Largest number of entries of the ``[b, d, d]`` products formed at once by
NOTE [Gram sums of per-datum blocks]."""


def _panel_width(d: int) -> int:
    if d <= 2 * PANEL:
        return d  # one product; panels this small gain nothing
    return PANEL if d <= 8 * PANEL else 2 * PANEL


def add_gram_upper_(accumulator: Tensor, rows: Tensor, *, alpha: float = 1.0) -> Tensor:
    r"""Add :math:`\alpha Z^\top Z` to the upper triangle of ``accumulator`` in place.

    See NOTE [upper-triangular Gram sums]: entries below the diagonal blocks are not
    updated; complete the result with :func:`mirror_upper_`.

    Args:
        accumulator: ``[d, d]`` matrix.
        rows: Rows ``[..., d]``, any strides (leading axes are flattened into rows).
        alpha: Scale of the added Gram matrix.

    Returns:
        ``accumulator``.
    """
    d = rows.shape[-1]
    if rows.numel() == 0:
        return accumulator
    width = _panel_width(d)
    if rows.stride(-1) == 1 or d == 1:
        Z = rows.reshape(-1, d)  # a view for row-major rows
        if width == d:  # one product (most layers; the loop's slicing costs time per batch)
            return accumulator.addmm_(Z.T, Z, alpha=alpha)
        for start in range(0, d, width):
            stop = min(start + width, d)
            accumulator[start:stop, start:].addmm_(Z[:, start:stop].T, Z[:, start:], alpha=alpha)
        return accumulator
    blocks = rows.transpose(-1, -2)
    if rows.ndim >= 3 and blocks.is_contiguous() and rows.shape[-2] >= d:
        # NOTE [Gram sums of per-datum blocks] (the whole matrix; the upper part is complete)
        G = blocks.reshape(-1, d, rows.shape[-2])
        step = max(1, BLOCK_CHUNK_ELEMENTS // (d * d))
        for start in range(0, G.shape[0], step):
            chunk = G[start : start + step]
            accumulator.add_(torch.bmm(chunk, chunk.transpose(1, 2)).sum(dim=0), alpha=alpha)
        return accumulator
    Zt = rows.movedim(-1, 0).reshape(d, -1)  # a view for feature-major rows
    for start in range(0, d, width):
        stop = min(start + width, d)
        accumulator[start:stop, start:].addmm_(Zt[start:stop], Zt[start:].T, alpha=alpha)
    return accumulator


def mirror_upper_(accumulator: Tensor) -> Tensor:
    """Complete a Gram sum of :func:`add_gram_upper_` to the symmetric matrix, in place.

    Copies the (transposed) blocks right of every diagonal panel below it; the diagonal
    panels are already complete. Costs one copy of fewer than half the entries.

    Args:
        accumulator: ``[d, d]`` matrix accumulated by :func:`add_gram_upper_`.

    Returns:
        ``accumulator``, now symmetric.
    """
    d = accumulator.shape[0]
    width = _panel_width(d)
    for start in range(0, d - width, width):
        stop = start + width
        accumulator[stop:, start:stop] = accumulator[start:stop, stop:].T
    return accumulator
