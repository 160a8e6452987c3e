r"""Products with the rearranged curvature block of one layer, from per-datum gradients.

Van Loan, C. F., Pitsianis, N. (1993). Approximation with Kronecker products.

NOTE [rearranged block]: a layer's exact block of the GGN (or a Fisher) on its row-major
weight matrix :math:`W \in \mathbb{R}^{m \times n}` is

.. math::
    C = \sum_i w_i \operatorname{vec}_r(G_i) \operatorname{vec}_r(G_i)^\top,
    \qquad G_i = \sum_t g_{i,t} x_{i,t}^\top = \Gamma_i^\top X_i,

a sum over the per-datum (would-be) gradients :math:`G_i` of every datum and output factor
:math:`i = (n, k)` (NOTE [KFAC scaling] of :mod:`curvops.kronecker.factors`; batch weight
:math:`w_i`), with input rows :math:`X_i = [x_{i,1}, \dots, x_{i,T}]^\top \in
\mathbb{R}^{T \times n}` and output-gradient rows :math:`\Gamma_i \in \mathbb{R}^{T \times
m}` over the :math:`T` shared positions. The rearrangement :math:`\mathcal{R}` of Van Loan &
Pitsianis maps :math:`B \otimes A` (NOTE [Kronecker order] of
:mod:`curvops.structured.kronecker`) to :math:`\operatorname{vec}(B)\operatorname{vec}(A)^\top`,
so that :math:`\|C - B \otimes A\|_F = \|\mathcal{R}(C) - \operatorname{vec}(B)
\operatorname{vec}(A)^\top\|_F` and the nearest Kronecker product comes from the top singular
pair of :math:`\mathcal{R}(C)`. Since :math:`\operatorname{vec}_r(g x^\top)
\operatorname{vec}_r(g' x'^\top)^\top = (g g'^\top) \otimes (x x'^\top)`,

.. math::
    \mathcal{R}(C) = \sum_i w_i \sum_{t,s} \operatorname{vec}(g_{i,t} g_{i,s}^\top)
    \operatorname{vec}(x_{i,t} x_{i,s}^\top)^\top,

and its products need only the per-datum quantities, never the :math:`m^2 \times n^2` matrix:

.. math::
    \mathcal{R}(C) \operatorname{vec}(A) = \operatorname{vec}\Big(\sum_i w_i G_i A G_i^\top\Big)
    = \operatorname{vec}\Big(\sum_i w_i \Gamma_i^\top (X_i A X_i^\top) \Gamma_i\Big),
    \qquad
    \mathcal{R}(C)^\top \operatorname{vec}(B) = \operatorname{vec}\Big(\sum_i w_i G_i^\top B
    G_i\Big) = \operatorname{vec}\Big(\sum_i w_i X_i^\top (\Gamma_i B \Gamma_i^\top) X_i\Big).

Both map symmetric PSD matrices to symmetric PSD matrices; the layouts below expect PSD
arguments (the iterates of the power iteration). Two layouts of the per-datum
gradients evaluate them (for :math:`K` output factors and :math:`N` data, one product each):

* :class:`RowGradients` keeps the rows :math:`X_n` (shared by the :math:`K` factors) and
  :math:`\Gamma_{k,n}`: :math:`\mathcal{O}(N T n (T + n) + K N T m (T + m))` flops and
  :math:`N T n + K N T m` stored entries. For :math:`T = 1` (an ``nn.Linear`` on
  ``[N, d_in]``) the :math:`T \times T` matrices are scalars,
  :math:`x_n^\top A x_n` and :math:`g_{k,n}^\top B g_{k,n}`, and a product costs about as
  much as accumulating a KFAC factor.
* :class:`MatrixGradients` forms the gradients :math:`G_{k,n}` once
  (:math:`\mathcal{O}(K N T m n)`): :math:`\mathcal{O}(K N m n (m + n))` flops per product and
  :math:`K N m n` stored entries, cheaper when :math:`T` exceeds the layer's dimensions (a
  convolution with many output locations).

:func:`choose_layout` picks the cheaper one per layer.

NOTE [rearranged embedding block]: an embedding's input rows are one-hot tokens, and its block
on the weight ``[E, D]`` is :math:`A \otimes B` with :math:`A \in \mathbb{R}^{E \times E}`
(:class:`curvops.kronecker.layers.EmbeddingLayer`). Its input factor is restricted to be
diagonal, :math:`A = \operatorname{diag}(a)` (as in KFAC: a dense :math:`E \times E` factor is
unaffordable for a vocabulary), so the approximation is the best one with a diagonal input
factor: the top singular pair of :math:`\mathcal{R}(C) P` with :math:`P` selecting the
diagonal entries. With :math:`h_{i,e} = \sum_{t: \text{token}_{i,t} = e} g_{i,t}` (the
gradient of the datum w.r.t. row :math:`e` of the weight, :class:`TokenGradients`),

.. math::
    B' = \sum_i w_i \sum_e a_e h_{i,e} h_{i,e}^\top, \qquad
    a'_e = \sum_i w_i h_{i,e}^\top B h_{i,e}.

Where each datum holds a token at most once (e.g. :math:`T = 1`), :math:`\mathcal{R}(C)^\top`
maps into diagonal matrices already, and the restriction loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvops.kronecker.gram import add_gram_upper_, mirror_upper_


def _weighted_gram(rows: Tensor, scale: Tensor | None, weight: float) -> Tensor:
    r""":math:`w \sum_r s_r z_r z_r^\top` for rows ``[..., d]`` and scales ``[...]``.

    The scales are quadratic forms of PSD factors, non-negative up to round-off (clipped at
    0), so the sum is the Gram matrix of the rows :math:`\sqrt{s_r} z_r`, accumulated in its
    upper triangle (NOTE [upper-triangular Gram sums] of :mod:`curvops.kronecker.gram`).
    """
    Z = rows.reshape(-1, rows.shape[-1])
    if scale is not None:
        Z = Z * scale.reshape(-1, 1).clamp(min=0).sqrt()
    out = Z.new_zeros(Z.shape[1], Z.shape[1])
    return mirror_upper_(add_gram_upper_(out, Z, alpha=weight))


@dataclass
class RowGradients:
    r"""One batch's per-datum gradients of a layer as rows (:class:`RowGradients` layout).

    The output-gradient rows are stored datum-major, ``[N, T, K, m]``, so that the
    :math:`T \times T` products of all :math:`K` factors of a datum are one batched matrix
    product (no copy of :math:`X_n A X_n^\top` per factor).

    Attributes:
        inputs: Input rows :math:`X` ``[N, T, n]``.
        grads: Output-gradient rows :math:`\Gamma` ``[N, T, K, m]``.
        weight: The batch weight :math:`w_\mathbb{B}`.
    """

    inputs: Tensor
    grads: Tensor
    weight: float

    @classmethod
    def from_rows(cls, inputs: Tensor, grads: Tensor, weight: float) -> RowGradients:
        """Store rows ``[N, T, n]`` and ``[K, N, T, m]`` (the latter copied datum-major)."""
        return cls(inputs, grads.permute(1, 2, 0, 3).contiguous(), weight)

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics (for the cache budget)."""
        return (self.inputs.numel() + self.grads.numel()) * self.grads.element_size()

    def _by_datum(self) -> Tensor:
        """The gradient rows as ``[N, T, K m]``."""
        N, T = self.grads.shape[:2]
        return self.grads.reshape(N, T, -1)

    def _weighted_gradient_gram(self, M: Tensor, scale: float) -> Tensor:
        r""":math:`c \sum_{k,n} w \Gamma_{k,n}^\top M_n \Gamma_{k,n}` for ``M`` ``[N, T, T]``."""
        X, g = self.inputs, self.grads
        m = g.shape[-1]
        if X.shape[1] == 1:  # scalars M_n
            q = M.reshape(-1, 1).expand(-1, g.shape[2])  # [N, K]
            return _weighted_gram(g, q, self.weight * scale)
        Y = torch.bmm(M, self._by_datum())  # [N, T, K m]
        return torch.mm(g.reshape(-1, m).T, Y.reshape(-1, m)).mul_(self.weight * scale)

    def rearranged(self, A: Tensor) -> Tensor:
        r""":math:`\sum_i w_i \Gamma_i^\top (X_i A X_i^\top) \Gamma_i`, ``[m, m]``."""
        X = self.inputs
        if X.shape[1] == 1:
            M = ((X[:, 0] @ A) * X[:, 0]).sum(-1)  # scalars x_n^T A x_n
        else:
            M = (X @ A) @ X.transpose(1, 2)  # [N, T, T]
        return self._weighted_gradient_gram(M, 1.0)

    def rearranged_identity(self, scale: float) -> Tensor:
        r""":meth:`rearranged` of :math:`A = c I` without the products with :math:`A`."""
        X = self.inputs
        M = X[:, 0].square().sum(-1) if X.shape[1] == 1 else X @ X.transpose(1, 2)
        return self._weighted_gradient_gram(M, scale)

    def rearranged_adjoint(self, B: Tensor) -> Tensor:
        r""":math:`\sum_i w_i X_i^\top (\Gamma_i B \Gamma_i^\top) X_i`, ``[n, n]``."""
        X, g = self.inputs, self.grads
        N, T, K, m = g.shape
        Z = (g.reshape(-1, m) @ B).reshape(N, T, K * m)
        if T == 1:  # scalars sum_k g_kn^T B g_kn
            p = (Z.reshape(N, -1) * g.reshape(N, -1)).sum(-1)
            return _weighted_gram(X[:, 0], p, self.weight)
        S = torch.bmm(Z, self._by_datum().transpose(1, 2))  # [N, T, T], summed over k
        n = X.shape[-1]
        return torch.mm(X.reshape(-1, n).T, (S @ X).reshape(-1, n)).mul_(self.weight)


@dataclass
class MatrixGradients:
    r"""One batch's per-datum gradient matrices :math:`G_i` ``[K N, m, n]`` of a layer.

    Attributes:
        grads: :math:`G_i = \Gamma_i^\top X_i` for every output factor and datum.
        weight: The batch weight :math:`w_\mathbb{B}`.
    """

    grads: Tensor
    weight: float

    @classmethod
    def from_rows(cls, inputs: Tensor, grads: Tensor, weight: float) -> MatrixGradients:
        r"""Form :math:`G_{k,n} = \Gamma_{k,n}^\top X_n` from rows ``[N, T, n]``, ``[K,N,T,m]``.

        One batched product per datum for all :math:`K` factors (``[K m, T] @ [T, n]``), not a
        product broadcast over the factors (which copies the inputs :math:`K` times).
        """
        K, N, T, m = grads.shape
        rows = grads.permute(1, 0, 3, 2).reshape(N, K * m, T)
        G = torch.bmm(rows, inputs)  # [N, K m, n], i = (n, k)
        return cls(G.reshape(N * K, m, inputs.shape[-1]), weight)

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics (for the cache budget)."""
        return self.grads.numel() * self.grads.element_size()

    def rearranged(self, A: Tensor) -> Tensor:
        r""":math:`\sum_i w_i G_i A G_i^\top`, ``[m, m]``."""
        G = self.grads
        return torch.einsum("imn,ion->mo", G @ A, G).mul_(self.weight)

    def rearranged_identity(self, scale: float) -> Tensor:
        r""":meth:`rearranged` of :math:`A = c I`: :math:`c \sum_i w_i G_i G_i^\top`."""
        return _weighted_gram(self.grads.transpose(1, 2), None, self.weight * scale)

    def rearranged_adjoint(self, B: Tensor) -> Tensor:
        r""":math:`\sum_i w_i G_i^\top B G_i`, ``[n, n]``."""
        G = self.grads
        return torch.einsum("imn,imo->no", B @ G, G).mul_(self.weight)


@dataclass
class TokenGradients:
    r"""One batch's per-datum gradients of an embedding, summed per token.

    See NOTE [rearranged embedding block].

    Attributes:
        grads: :math:`h_{k,u}` ``[K, U, D]`` for the :math:`U` distinct (datum, token) pairs.
        tokens: The token :math:`e_u` of each pair, ``[U]``.
        num_embeddings: :math:`E`.
        weight: The batch weight :math:`w_\mathbb{B}`.
    """

    grads: Tensor
    tokens: Tensor
    num_embeddings: int
    weight: float

    @classmethod
    def from_ids(
        cls, ids: Tensor, grads: Tensor, num_embeddings: int, padding_idx: int | None, weight: float
    ) -> TokenGradients:
        """Sum the gradient rows ``[K, N, T, D]`` of equal tokens ``[N, T]`` within each datum.

        Tokens equal to ``padding_idx`` get no gradient and are left out.
        """
        K, N, T, D = grads.shape
        key = (torch.arange(N, device=ids.device)[:, None] * num_embeddings + ids).reshape(-1)
        rows = grads.reshape(K, N * T, D)
        if padding_idx is not None:
            keep = ids.reshape(-1) != padding_idx
            key, rows = key[keep], rows[:, keep]
        pairs, inverse = torch.unique(key, return_inverse=True)
        h = rows.new_zeros(K, pairs.numel(), D).index_add_(1, inverse, rows)
        return cls(h, pairs % num_embeddings, num_embeddings, weight)

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics (for the cache budget)."""
        return self.grads.numel() * self.grads.element_size() + self.tokens.numel() * 8

    def rearranged(self, a: Tensor) -> Tensor:
        r""":math:`\sum_i w_i \sum_e a_e h_{i,e} h_{i,e}^\top`, ``[D, D]``."""
        h = self.grads
        return _weighted_gram(h, a[self.tokens].expand(h.shape[0], -1), self.weight)

    def rearranged_identity(self, scale: float) -> Tensor:
        r""":meth:`rearranged` of :math:`a = c \mathbf{1}`: :math:`c \sum_i w_i \sum_e h h^\top`."""
        return _weighted_gram(self.grads, None, self.weight * scale)

    def rearranged_adjoint(self, B: Tensor) -> Tensor:
        r""":math:`a'_e = \sum_i w_i h_{i,e}^\top B h_{i,e}`, ``[E]``."""
        h = self.grads
        q = ((h @ B) * h).sum(dim=(0, 2))  # [U]
        out = q.new_zeros(self.num_embeddings).index_add_(0, self.tokens, q)
        return out.mul_(self.weight)


def choose_layout(K: int, T: int, m: int, n: int) -> str:
    r"""The cheaper layout for a layer: ``"rows"`` or ``"matrices"`` (NOTE [rearranged block]).

    Compares the flops of one product in each layout, counting the formation of the
    gradient matrices (:math:`K T m n` per datum) against :class:`MatrixGradients`.

    Args:
        K: Number of output factors per datum.
        T: Number of shared positions per datum.
        m: Output dimension of the layer.
        n: Input dimension of the layer (with a joint bias: plus one).

    Returns:
        ``"rows"`` or ``"matrices"``.
    """
    rows = T * n * (T + n) + K * T * m * (T + m)
    matrices = K * m * n * (m + n + T)
    return "rows" if T == 1 or rows <= matrices else "matrices"
