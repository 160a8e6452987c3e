r"""An embedding tied to a linear output layer (GPT-2 layout): one Kronecker block for both.

NOTE [tied embedding and output layer]: a weight :math:`W \in \mathbb{R}^{V \times E}` used
by ``F.embedding(ids, W)`` (input rows :math:`h = W^\top e_\text{id}`) and by
``F.linear(h, W)`` (logits :math:`z = W h`) has the per-datum gradient

.. math::
    G_{k,n} = \sum_t e_{\text{id}_{n,t}} (g^\text{emb}_{k,n,t})^\top
            + \sum_s g^\text{lin}_{k,n,s} h_{n,s}^\top \in \mathbb{R}^{V \times E}.

Each kind of call alone has its KFAC block on the row-major ``[V, E]`` weight (NOTE [KFAC
scaling] of :mod:`curvops.kronecker.factors`, ``expand``): the linear calls
:math:`B_\text{lin} \otimes A_\text{lin}` (gradient factor over the vocabulary, input factor
over the embedding dimension), the embedding calls :math:`\operatorname{diag}(a_\text{emb})
\otimes B_\text{emb}` (token frequencies over the vocabulary, gradient factor over the
embedding dimension). The roles of the two axes are swapped between the kinds, so pooling the
rows of both kinds into one factor pair, as for calls of one kind (NOTE [weight sharing] of
:mod:`curvops.kronecker.layers`), would add one-hot inputs (frequencies of order 1) to output
gradients (which carry the loss scale) on the same axis: a mismatch of many orders of
magnitude. Instead the block is the Kronecker product closest in Frobenius norm to the sum
of the two kinds' blocks (Van Loan, C. F., Pitsianis, N. (1993). Approximation with
Kronecker products),

.. math::
    P \otimes Q = \operatorname{arg\,min}_{P, Q} \big\| B_\text{lin} \otimes A_\text{lin}
    + \operatorname{diag}(a_\text{emb}) \otimes B_\text{emb} - P \otimes Q \big\|_F .

Rearranging :math:`X \otimes Y \mapsto \operatorname{vec}(X) \operatorname{vec}(Y)^\top`
turns the sum :math:`\sum_i P_i \otimes Q_i` into a rank-two matrix whose leading singular
pair gives :math:`Q = \sum_i \beta_i Q_i` and :math:`P = \sum_i \alpha_i P_i`, with
:math:`\beta` the leading (Perron) eigenvector of :math:`G_P G_Q` (the Gram matrices
:math:`\langle P_i, P_j \rangle_F`, :math:`\langle Q_i, Q_j \rangle_F`) and
:math:`\alpha = G_Q \beta / (\beta^\top G_Q \beta)` (:func:`nearest_kronecker_of_sum`). The
inner products of positive semi-definite matrices are non-negative, so :math:`\alpha, \beta
\ge 0` and :math:`P, Q` are positive semi-definite. The scale is split with
:math:`\operatorname{tr} Q = \operatorname{tr} A_\text{lin}`. The result is exact if one kind's
block vanishes or the two blocks share a factor up to scale; like KFAC-expand across
positions, it drops the cross terms between the calls of a datum. The factors of each kind
follow NOTE [KFAC scaling] (padding row weights, ``num_per_example_loss_terms``).
``kfac_approx="reduce"`` is refused, as for embeddings. The layer's
:class:`~curvops.kronecker.factors.LayerFactors` are those of a linear layer on ``[V, E]``
(gradient factor :math:`P`, input factor :math:`Q`). EKFAC corrects the eigenvalues in the
eigenbasis of :math:`P \otimes Q` with the exact per-datum gradients :math:`G_{k,n}` above
(cross terms included), so its diagonal in that basis is the exact one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.kronecker.corrections import CHUNK_ELEMENTS, CorrectionAccumulator
from curvops.kronecker.factors import FactorAccumulator, LayerFactors
from curvops.kronecker.layers import EmbeddingLayer, KFACLayer, LinearLayer
from curvops.kronecker.uses import EMBEDDING, LINEAR, LayerInputs


class TiedEmbeddingLinearLayer(KFACLayer):
    """A weight ``[V, E]`` used by embedding calls and by linear calls.

    See NOTE [tied embedding and output layer]. Its statistics are those of two views,
    :attr:`embedding` and :attr:`linear`, each seeing the calls of its kind (:meth:`split`);
    it has no rows of its own.

    Attributes:
        padding_idx: The embedding calls' ``padding_idx``, or ``None``.
        embedding: The layer seen through its embedding calls.
        linear: The layer seen through its linear calls.
    """

    kind = f"{EMBEDDING}+{LINEAR}"
    has_embedding_calls = True

    def __init__(self, *args, padding_idx: int | None = None, **kwargs):  # noqa: D107
        super().__init__(*args, **kwargs)
        self.padding_idx = padding_idx
        self.kinds = (EMBEDDING, LINEAR)
        same = {
            "weight_shape": self.weight_shape,
            "dtype": self.dtype,
            "device": self.device,
            "type_name": self.type_name,
        }
        self.embedding = EmbeddingLayer(
            self.name, self.module, self.weight_index, None, padding_idx=padding_idx, **same
        )
        self.linear = LinearLayer(self.name, self.module, self.weight_index, None, **same)

    def split(
        self, inputs: LayerInputs, grad_output: Tensor | tuple[Tensor, ...] | None
    ) -> dict[str, tuple[LayerInputs, tuple[Tensor, ...] | None]]:
        """The inputs and output gradients of one batch, by kind of call.

        Args:
            inputs: The layer's inputs (all calls).
            grad_output: Their output gradients (a tensor for one call), or ``None``.

        Returns:
            For each kind with calls in this batch, its inputs and output gradients.
        """
        if grad_output is not None and not isinstance(grad_output, tuple):
            grad_output = (grad_output,)
        out = {}
        for kind in (EMBEDDING, LINEAR):
            picked = [i for i, call in enumerate(inputs.calls) if call.kind == kind]
            if not picked:
                continue
            grads = None if grad_output is None else tuple(grad_output[i] for i in picked)
            out[kind] = (LayerInputs(inputs.calls[i] for i in picked), grads)
        return out

    def views(self) -> dict[str, KFACLayer]:
        """The views by kind."""
        return {EMBEDDING: self.embedding, LINEAR: self.linear}

    def input_rows(self, inputs: tuple) -> Tensor:
        """Not defined: the two kinds of calls have no common rows (use :meth:`split`)."""
        raise NotImplementedError(
            f"{self.type_name} '{self.name}' is a weight tied between an embedding and a "
            "linear layer; its calls have no common input rows. Use split() and the views."
        )

    grad_rows = input_rows
    factor_input_rows = input_rows


def nearest_kronecker_of_sum(
    terms: list[tuple[Tensor, Tensor]], *, reference: int = 0
) -> tuple[Tensor, Tensor]:
    r"""The Kronecker product :math:`P \otimes Q` nearest to :math:`\sum_i P_i \otimes Q_i`.

    Frobenius norm; NOTE [tied embedding and output layer] (Van Loan & Pitsianis (1993)).

    Args:
        terms: The pairs :math:`(P_i, Q_i)` of positive semi-definite matrices, each of them
            a square matrix or, for a diagonal matrix, its diagonal (a vector).
        reference: The term whose :math:`Q_i` gives the trace of :math:`Q`.

    Returns:
        :math:`P` and :math:`Q` (dense; diagonal only if all terms' are).
    """
    P_terms, Q_terms = [p for p, _ in terms], [q for _, q in terms]
    G_P, G_Q = _gram(P_terms), _gram(Q_terms)
    m = len(terms)
    M = G_P @ G_Q
    vals, vecs = torch.linalg.eig(M)
    top = int(vals.real.argmax())
    beta = vecs[:, top].real
    beta = beta * torch.sign(beta.sum()) if float(beta.sum()) != 0 else beta
    beta = beta.clamp(min=0)  # the Perron vector of a non-negative matrix (round-off)
    curvature = float(beta @ G_Q @ beta)
    if float(vals.real[top]) <= 0 or curvature <= 0:
        beta = torch.ones(m, dtype=G_Q.dtype)
        alpha = torch.zeros(m, dtype=G_Q.dtype)
    else:
        alpha = G_Q @ beta / curvature
    traces = torch.stack([_trace(q) for q in Q_terms]).to(G_Q.dtype)
    trace_Q, wanted = float(beta @ traces), float(traces[reference])
    if trace_Q > 0 and wanted > 0:
        scale = wanted / trace_Q
        beta, alpha = beta * scale, alpha / scale
    return _combine(P_terms, alpha), _combine(Q_terms, beta)


def _trace(M: Tensor) -> Tensor:
    return (M if M.ndim == 1 else M.diagonal()).sum()


def _inner(X: Tensor, Y: Tensor) -> Tensor:
    """Frobenius inner product of two matrices, each dense or a diagonal vector."""
    X, Y = X.double(), Y.double()
    if X.ndim == Y.ndim:
        return (X * Y).sum()
    if X.ndim == 1:
        X, Y = Y, X
    return (X.diagonal() * Y).sum()


def _gram(mats: list[Tensor]) -> Tensor:
    m = len(mats)
    G = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i, m):
            G[i, j] = G[j, i] = _inner(mats[i], mats[j])
    return G


def _combine(mats: list[Tensor], coefficients: Tensor) -> Tensor:
    dense = [i for i, M in enumerate(mats) if M.ndim == 2]
    like = mats[dense[0]] if dense else mats[0]
    out = torch.zeros_like(like)
    for i, M in enumerate(mats):
        c = float(coefficients[i])
        if M.ndim == like.ndim:
            out.add_(M, alpha=c)
        else:
            out.diagonal().add_(M, alpha=c)
    return out


class TiedFactorAccumulator:
    """KFAC statistics of a :class:`TiedEmbeddingLinearLayer`: one accumulator per kind.

    Same interface as :class:`~curvops.kronecker.factors.FactorAccumulator`.
    """

    def __init__(
        self,
        layer: TiedEmbeddingLinearLayer,
        kfac_approx: str,
        loss_terms: int | None,
        backward: bool,
    ):
        self.layer = layer
        self.parts = {
            kind: FactorAccumulator(view, kfac_approx, loss_terms, backward)
            for kind, view in layer.views().items()
        }

    def add(self, inputs, grad_output, weight: float, **kwargs) -> None:
        """Add one batch's contribution (see ``FactorAccumulator.add``)."""
        for kind, (sub_inputs, sub_grads) in self.layer.split(inputs, grad_output).items():
            self.parts[kind].add(sub_inputs, sub_grads, weight, **kwargs)

    def flush_counts(self) -> None:
        """Write the counts of both kinds (see ``FactorAccumulator.flush_counts``)."""
        for part in self.parts.values():
            part.flush_counts()

    def tensors(self) -> list[Tensor]:
        """The accumulators of both kinds (to be summed across processes in place)."""
        return [t for part in self.parts.values() for t in part.tensors()]

    def finalize(self, separate_weight_and_bias: bool, names: dict[int, str]) -> LayerFactors:
        """The nearest Kronecker product to the sum of both kinds' blocks.

        Args:
            separate_weight_and_bias: Unused (the layer has no bias).
            names: Parameter names by position in the parameter list.

        Returns:
            The layer's factors, those of a linear layer on the ``[V, E]`` weight.
        """
        emb = self.parts[EMBEDDING].finalize(separate_weight_and_bias, names)
        lin = self.parts[LINEAR].finalize(separate_weight_and_bias, names)
        P, Q = nearest_kronecker_of_sum(
            [(lin.gradient_factor, lin.input_factor), (emb.input_factor, emb.gradient_factor)]
        )
        layer = self.layer
        return LayerFactors(
            module_name=layer.name,
            module_type=layer.type_name,
            weight_name=names.get(layer.weight_index),
            bias_name=None,
            joint=False,
            input_factor=Q,
            gradient_factor=P,
            bias_input_factor=None,
        )


class TiedCorrectionAccumulator:
    """EKFAC's eigenvalue correction of a :class:`TiedEmbeddingLinearLayer`.

    Accumulates :math:`\\sum_{k,n} (Q_P^\\top G_{k,n} Q_Q)^{\\odot 2}` with the per-datum
    gradients :math:`G_{k,n}` of NOTE [tied embedding and output layer] (both kinds of calls),
    as sums of outer products of rows rotated into the eigenbasis: a linear call's rows
    :math:`(Q_P^\\top g, Q_Q^\\top h)`, an embedding call's :math:`(Q_P^\\top e_\\text{id},
    Q_Q^\\top g)` (row ``id`` of :math:`Q_P`). Same interface as
    :class:`~curvops.kronecker.corrections.CorrectionAccumulator`.

    Args:
        layer: The layer.
        factors: Its KFAC factors.
        input_basis: :math:`Q_Q`, eigenvectors of the input factor ``[E, E]``.
        gradient_basis: :math:`Q_P`, eigenvectors of the gradient factor ``[V, V]``.
    """

    def __init__(
        self,
        layer: TiedEmbeddingLinearLayer,
        factors: LayerFactors,
        input_basis: Tensor,
        gradient_basis: Tensor,
    ):
        self.layer = layer
        self.QA, self.QB = input_basis, gradient_basis
        V, E = layer.weight_shape
        like = {"dtype": gradient_basis.dtype, "device": gradient_basis.device}
        self.weight_sum = torch.zeros(V, E, **like)
        self.bias_sum = None

    def add(self, inputs: LayerInputs, grad_output, weight: float) -> None:
        """Add one batch's contribution.

        Args:
            inputs: The layer's inputs.
            grad_output: Output gradients of its calls (a tuple, or a tensor for one call).
            weight: The batch weight :math:`w_\\mathbb{B}`.
        """
        layer, QA, QB = self.layer, self.QA, self.QB
        lefts, rights = [], []
        parts = layer.split(inputs, grad_output)
        if LINEAR in parts:
            sub_inputs, grads = parts[LINEAR]
            lefts.append(layer.linear.grad_rows(grads) @ QB)  # [K, N, T, V]
            rights.append((layer.linear.input_rows(sub_inputs) @ QA).unsqueeze(0))  # [1, N, T, E]
        if EMBEDDING in parts:
            sub_inputs, grads = parts[EMBEDDING]
            ids = layer.embedding.input_rows(sub_inputs)  # [N, T]
            keep = layer.embedding.counted_tokens(ids)
            lefts.append((QB[ids] * keep.unsqueeze(-1).to(QB.dtype)).unsqueeze(0))
            rights.append(layer.embedding.grad_rows(grads) @ QA)  # [K, N, T, E]
        self.weight_sum.add_(_squared_sums_of_outer_products(lefts, rights), alpha=weight)

    def tensors(self) -> list[Tensor]:
        """The accumulated sum (to be summed across processes in place)."""
        return [self.weight_sum]


def _squared_sums_of_outer_products(lefts: list[Tensor], rights: list[Tensor]) -> Tensor:
    r""":math:`\sum_{k,n} (\sum_r l_{k,n,r} r_{k,n,r}^\top)^{\odot 2}` over all parts.

    Each part's rows are ``[K or 1, N, R, V]`` and ``[K or 1, N, R, E]`` (1: shared by all
    :math:`k`); the per-datum matrices are formed in chunks of at most
    :data:`~curvops.kronecker.corrections.CHUNK_ELEMENTS` entries.
    """
    K = max(max(t.shape[0] for t in lefts), max(t.shape[0] for t in rights))
    N, V, E = lefts[0].shape[1], lefts[0].shape[-1], rights[0].shape[-1]
    per_matrix = V * E
    k_chunk = max(1, min(K, CHUNK_ELEMENTS // per_matrix))
    n_chunk = max(1, min(N, CHUNK_ELEMENTS // (k_chunk * per_matrix)))
    out = torch.zeros(V, E, dtype=lefts[0].dtype, device=lefts[0].device)
    for k0 in range(0, K, k_chunk):
        for n0 in range(0, N, n_chunk):
            k = min(k_chunk, K - k0)
            n = min(n_chunk, N - n0)
            L = torch.cat([_chunk(t, k0, k, n0, n) for t in lefts], dim=2)  # [k, n, R, V]
            R = torch.cat([_chunk(t, k0, k, n0, n) for t in rights], dim=2)  # [k, n, R, E]
            out += (L.transpose(-1, -2) @ R).square_().sum(dim=(0, 1))
    return out


def _chunk(t: Tensor, k0: int, k: int, n0: int, n: int) -> Tensor:
    """Rows of factors ``k0:k0+k`` and data ``n0:n0+n`` (rows shared by all factors expanded)."""
    t = t[:, n0 : n0 + n]
    return t.expand(k, *t.shape[1:]) if t.shape[0] == 1 else t[k0 : k0 + k]


def factor_accumulator(
    layer: KFACLayer, kfac_approx: str, loss_terms: int | None, backward: bool
) -> FactorAccumulator | TiedFactorAccumulator:
    """The KFAC statistics accumulator of a layer."""
    if isinstance(layer, TiedEmbeddingLinearLayer):
        return TiedFactorAccumulator(layer, kfac_approx, loss_terms, backward)
    return FactorAccumulator(layer, kfac_approx, loss_terms, backward)


def correction_accumulator(
    layer: KFACLayer, factors: LayerFactors, input_basis: Tensor | None, gradient_basis: Tensor
) -> CorrectionAccumulator | TiedCorrectionAccumulator:
    """The EKFAC eigenvalue-correction accumulator of a layer."""
    if isinstance(layer, TiedEmbeddingLinearLayer):
        return TiedCorrectionAccumulator(layer, factors, input_basis, gradient_basis)
    return CorrectionAccumulator(layer, factors, input_basis, gradient_basis)
