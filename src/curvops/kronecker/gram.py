r"""Gram matrices of row collections, accumulated in place with one matrix product.

Both Kronecker factors are sums of outer products of rows,
:math:`\sum_r z_r z_r^\top = Z^\top Z` for the rows :math:`z_r` of a matrix
:math:`Z \in \mathbb{R}^{R \times d}` (input rows for :math:`A`, gradient rows for :math:`B`;
NOTE [KFAC scaling] of :mod:`curvops.kronecker.factors`). The rows arrive as a tensor
``[..., d]`` in one of two memory layouts, and the product is taken in the layout they are
stored in, so no operand is copied more than once:

* *row-major* rows (a linear layer's inputs ``[N, *, d]``, its output gradients): ``Z`` is a
  view ``[R, d]`` and the sum is one ``addmm`` with :math:`Z^\top` as a transposed view;
* *feature-major* rows (unfolded convolution patches, stored ``[d, N P]`` by
  :func:`curvops.kronecker.unfold.unfold_conv_input`; convolution output gradients
  ``[K, N, C, P]``): ``Z^\top`` is formed as ``[d, R]`` (a view for the patches, one copy
  for the gradients) and the sum is ``addmm`` of ``Z^\top`` with its transposed view.
"""

from __future__ import annotations

from torch import Tensor


def add_gram_(accumulator: Tensor, rows: Tensor, *, alpha: float = 1.0) -> Tensor:
    r"""Add :math:`\alpha Z^\top Z` to ``accumulator`` in place, for the rows ``Z`` of ``rows``.

    Args:
        accumulator: Contiguous ``[d, d]`` matrix.
        rows: Rows ``[..., d]``, any strides (leading axes are flattened into rows).
        alpha: Scale of the added Gram matrix.

    Returns:
        ``accumulator``.
    """
    d = rows.shape[-1]
    if rows.numel() == 0:
        return accumulator
    if rows.ndim == 1 or rows.stride(-1) == 1 or d == 1:
        Z = rows.reshape(-1, d)  # a view for row-major rows
        return accumulator.addmm_(Z.T, Z, alpha=alpha)
    Zt = rows.movedim(-1, 0).reshape(d, -1)  # a view for feature-major rows
    return accumulator.addmm_(Zt, Zt.T, alpha=alpha)
