r"""EKFAC's eigenvalue correction: per-datum gradients projected onto the KFAC eigenbasis.

George, T., Laurent, C., Bouthillier, X., Ballas, N., Vincent, P. (2018). Fast approximate
natural gradient descent in a Kronecker-factored eigenbasis.

With the eigendecompositions :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`B = Q_B \Lambda_B
Q_B^\top`, EKFAC keeps the eigenbasis :math:`Q_B \otimes Q_A` and replaces the eigenvalues
:math:`\Lambda_B \otimes \Lambda_A` by the exact diagonal of the curvature in that basis,

.. math::
    \Lambda^\star = \sum_\mathbb{B} w_\mathbb{B} \sum_{n \in \mathbb{B}} \sum_k
    \left(Q_B^\top G_{k,n} Q_A\right)^{\odot 2},
    \qquad G_{k,n} = \sum_t g_{k,n,t} x_{n,t}^\top,

the squared *per-datum* weight gradients (summed over the shared positions of a datum before
squaring) in the eigenbasis (notation of NOTE [KFAC scaling] in
:mod:`curvops.kronecker.factors`). For ``type-2`` the output factors are split into one
factor per output position (NOTE [output factors] of :mod:`curvops.losses.likelihood`), so
that :math:`\sum_k` runs over the columns of each position's loss-Hessian square root and
:math:`\Lambda^\star` is the exact GGN diagonal also for sequence outputs; the empirical
flavour splits them for ``expand`` too (the empirical Fisher per loss term) and keeps one
gradient per datum for ``reduce`` (NOTE [KFAC scaling]). This minimises the
Frobenius distance to the curvature block among all matrices with that eigenbasis, so EKFAC is
at least as close to it as KFAC.

NOTE [squared per-datum gradients]: with gradient rows in the eigenbasis
:math:`\tilde g_{k,n,t} = Q_B^\top g_{k,n,t}` and input rows :math:`y_{n,t} = Q_A^\top
x_{n,t}`, the weight correction is :math:`\sum_{k,n} (\tilde G_{k,n})^{\odot 2}` with
:math:`\tilde G_{k,n} = \sum_t \tilde g_{k,n,t} y_{n,t}^\top` (:func:`squared_gradient_sum`).

* Without shared positions (:math:`T = 1`: linear layers on unstructured inputs), each
  :math:`\tilde G_{k,n}` is rank one and :math:`(\tilde g\, y^\top)^{\odot 2} = \tilde g^{\odot 2}
  (y^{\odot 2})^\top`, so the sum is ONE matrix product,
  :math:`\sum_n (\sum_k \tilde g_{k,n}^{\odot 2}) (y_n^{\odot 2})^\top`: cost
  :math:`N d_\text{out} d_\text{in}`, memory of the rows only.
* With :math:`T > 1` (convolutions, sequences) the per-datum matrices :math:`\tilde G_{k,n}` are
  formed by batched matrix products over chunks of data (and of :math:`k` if needed) whose
  temporary ``[k_chunk * n_chunk, d_out, d_in]`` holds at most :data:`CHUNK_ELEMENTS` entries
  (at least one datum's one matrix, the weight's size; rotating a chunk into the eigenbasis
  makes at most two such temporaries), then squared in place and summed. Each side is rotated
  into the eigenbasis where it is cheaper: the rows before the products (``g @ Q_B`` costs
  :math:`K N T d_\text{out}^2`, ``x @ Q_A`` costs :math:`N T d_\text{in}^2`) or the
  per-datum matrices after (:math:`K N d_\text{out}^2 d_\text{in}`, resp.
  :math:`K N d_\text{out} d_\text{in}^2`); convolutions with many output locations rotate
  after. The result is exact; the chunking only bounds the memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.layers import KFACLayer

#: Most entries of the temporary per-datum gradients ``[k_chunk * n_chunk, d_out, d_in]`` that
#: :func:`squared_gradient_sum` holds at once for layers with shared positions (``2**22``
#: entries: 32 MiB in float64, 16 MiB in float32), see NOTE [squared per-datum gradients].
CHUNK_ELEMENTS = 2**22


def squared_gradient_sum(
    g: Tensor, x: Tensor, QB: Tensor, QA: Tensor, *, bias_column: bool = False
) -> Tensor:
    r"""Squared per-datum weight gradients in the eigenbasis, summed over :math:`k` and data.

    Computes :math:`\sum_{k,n} (Q_B^\top G_{k,n} Q_A)^{\odot 2}` with
    :math:`G_{k,n} = \sum_t g_{k,n,t} \bar x_{n,t}^\top`, where :math:`\bar x = x`, or
    :math:`\bar x = (x, 1)` with ``bias_column`` (the last row of :math:`Q_A` then belongs to
    the bias' constant input). See NOTE [squared per-datum gradients]: one matrix product for
    :math:`T = 1`, else batched products over chunks of at most :data:`CHUNK_ELEMENTS`
    entries, each side rotated into the eigenbasis before or after the per-datum product,
    whichever is cheaper.

    Args:
        g: Gradient rows ``[K, N, T, d_out]``.
        x: Input rows ``[N, T, d_x]``.
        QB: :math:`Q_B`, ``[d_out, d_out]``.
        QA: :math:`Q_A`, ``[d_x (+1), d_in]``.
        bias_column: Whether the inputs get a constant 1 appended (a joint bias).

    Returns:
        ``[d_out, d_in]``.
    """
    K, N, T, d_out = g.shape
    QA_w, QA_b = (QA[:-1], QA[-1]) if bias_column else (QA, None)
    d_in = QA.shape[1]
    if T == 1:
        y = _rotate_rows(x[:, 0], QA_w, QA_b)
        return (g[:, :, 0] @ QB).square().sum(dim=0).T @ y.square()
    # rotating g first costs K N T d_out^2, the per-datum matrices after K N d_out^2 d_in;
    # rotating x first costs N T d_x d_in, the per-datum matrices after K N d_out d_x d_in
    rotate_g_first, rotate_x_first = T <= d_in, T <= K * d_out
    if rotate_g_first:
        g = g @ QB
    if rotate_x_first:
        x = _rotate_rows(x, QA_w, QA_b)
    out = torch.zeros(d_out * d_in, dtype=g.dtype, device=g.device)
    per_matrix = d_out * d_in
    k_chunk = max(1, min(K, CHUNK_ELEMENTS // per_matrix))
    n_chunk = max(1, min(N, CHUNK_ELEMENTS // (k_chunk * per_matrix)))
    for k0 in range(0, K, k_chunk):
        for n0 in range(0, N, n_chunk):
            gc = g[k0 : k0 + k_chunk, n0 : n0 + n_chunk]  # [k, n, T, d_out]
            k, n = gc.shape[:2]
            # [n, k * d_out, T] (a view for k == 1) times [n, T, d_x or d_in]
            lhs = gc.permute(1, 0, 3, 2).reshape(n, k * d_out, T)
            per_datum = torch.bmm(lhs, x[n0 : n0 + n])
            if not rotate_x_first:
                per_datum = per_datum @ QA_w
                if QA_b is not None:  # the bias column's gradient is sum_t g
                    per_datum.add_(lhs.sum(dim=-1, keepdim=True) * QA_b)
            per_datum = per_datum.reshape(n * k, d_out, d_in)
            if not rotate_g_first:
                per_datum = torch.matmul(QB.T, per_datum)
            out += per_datum.square_().reshape(n * k, per_matrix).sum(dim=0)
    return out.reshape(d_out, d_in)


def _rotate_rows(x: Tensor, QA_w: Tensor, QA_b: Tensor | None) -> Tensor:
    """Rows ``(x, 1) @ QA`` (``x @ QA`` without a bias row), without appending the 1."""
    y = x @ QA_w
    return y if QA_b is None else y.add_(QA_b)


class CorrectionAccumulator:
    """Sums of one layer's eigenvalue corrections over the batches of a pass.

    Args:
        layer: The layer.
        factors: The layer's KFAC factors (which blocks exist).
        input_basis: :math:`Q_A` (``None`` for an embedding, whose :math:`A` is diagonal,
            or without a weight).
        gradient_basis: :math:`Q_B`.
    """

    def __init__(
        self,
        layer: KFACLayer,
        factors: LayerFactors,
        input_basis: Tensor | None,
        gradient_basis: Tensor,
    ):
        self.layer = layer
        self.factors = factors
        self.QA = input_basis
        self.QB = gradient_basis
        like = {"dtype": gradient_basis.dtype, "device": gradient_basis.device}
        d_out = gradient_basis.shape[0]
        self.weight_sum: Tensor | None = None
        if factors.input_factor is not None:
            shape = (
                tuple(layer.weight_shape)
                if factors.diagonal_input
                else (d_out, factors.input_factor.shape[0])
            )
            self.weight_sum = torch.zeros(shape, **like)
        self.bias_sum = (
            torch.zeros(d_out, **like) if factors.bias_input_factor is not None else None
        )

    def add(self, inputs: tuple, grad_output: Tensor, weight: float) -> None:
        """Add one batch's contribution.

        Args:
            inputs: The layer's positional inputs.
            grad_output: Output gradients ``[K, *output.shape]``.
            weight: The batch weight :math:`w_\\mathbb{B}`.
        """
        f, layer = self.factors, self.layer
        g = layer.grad_rows(grad_output)  # [K, N, T, d_out]
        if f.input_factor is not None:
            if f.diagonal_input:
                contribution = self._embedding_squares(layer.input_rows(inputs), g @ self.QB)
            else:
                x, order = layer.factor_input_rows(inputs)
                QA = self.QA
                if order is not None:  # x[..., j] is feature order[j]; rows of QA alike
                    QA = torch.cat([QA[order], QA[order.numel() :]])
                bias_column = f.joint and layer.bias_index is not None
                contribution = squared_gradient_sum(g, x, self.QB, QA, bias_column=bias_column)
            self.weight_sum.add_(contribution, alpha=weight)
        if f.bias_input_factor is not None:
            contribution = (g.sum(dim=2) @ self.QB).square().sum(dim=(0, 1))
            self.bias_sum.add_(contribution, alpha=weight)

    def _embedding_squares(self, ids: Tensor, g: Tensor) -> Tensor:
        """Squared per-datum embedding gradients in the eigenbasis, ``[E, D]``.

        Computes :math:`\\sum_{k,n} (\\sum_t e_{id_{n,t}} (Q_B^\\top g_{k,n,t})^\\top)^{\\odot 2}`.

        Positions of one datum with the same token are summed before squaring; the sum
        runs over the distinct (datum, token) pairs only.
        """
        layer = self.layer
        num, dim = layer.weight_shape
        N, T = ids.shape
        keys = (torch.arange(N, device=ids.device).unsqueeze(1) * num + ids).reshape(-1)
        keep = torch.ones_like(keys, dtype=torch.bool)
        if layer.padding_idx is not None:
            keep = ids.reshape(-1) != layer.padding_idx
        unique, inverse = torch.unique(keys[keep], return_inverse=True)
        rows = g.reshape(g.shape[0], N * T, dim)[:, keep]
        summed = torch.zeros(g.shape[0], unique.numel(), dim, dtype=g.dtype, device=g.device)
        summed.index_add_(1, inverse, rows)
        out = torch.zeros(num, dim, dtype=g.dtype, device=g.device)
        out.index_add_(0, unique % num, summed.square().sum(dim=0))
        return out

    def tensors(self) -> list[Tensor]:
        """The accumulated sums (to be summed across processes in place)."""
        return [t for t in (self.weight_sum, self.bias_sum) if t is not None]
