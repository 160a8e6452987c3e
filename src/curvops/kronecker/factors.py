r"""The Kronecker factors of one layer, and the KFAC factor accumulation.

NOTE [KFAC scaling]: the curvature matrix KFAC approximates is
:math:`C = \sum_\mathbb{B} w_\mathbb{B} \sum_{n \in \mathbb{B}} \sum_k g_{k,n} g_{k,n}^\top`
with per-datum (would-be) gradients :math:`g_{k,n} = J_\theta f_n^\top s_k[n]`, batch
weights :math:`w_\mathbb{B} = R_\mathbb{D}/R_\mathbb{B}` (NOTE [batch weights] of
:mod:`curvops.risk.empirical_risk`) and output factors :math:`s_k[n]` that include
:math:`\sqrt{R_\mathbb{B}}` (NOTE [loss scaling] of :mod:`curvops.losses`). So
:math:`w_\mathbb{B} R_\mathbb{B} = R_\mathbb{D}` and every batching gives the same matrix.
For a layer :math:`z_{n,t} = W x_{n,t}` with shared positions :math:`t = 1..T` and output
gradients :math:`g_{k,n,t} = \partial (s_k[n]^\top f_n) / \partial z_{n,t}`, the per-datum
weight gradient is :math:`G_{k,n} = \sum_t g_{k,n,t} x_{n,t}^\top`, and

* ``expand``: :math:`A = \frac{1}{N T} \sum_{n,t} x_{n,t} x_{n,t}^\top`,
  :math:`B = \sum_\mathbb{B} w_\mathbb{B} \sum_{k,n,t} g_{k,n,t} g_{k,n,t}^\top`;
* ``reduce``: :math:`A = \frac{1}{N} \sum_n \bar x_n \bar x_n^\top` with
  :math:`\bar x_n = \frac{1}{T}\sum_t x_{n,t}`,
  :math:`B = \sum_\mathbb{B} w_\mathbb{B} \sum_{k,n} (\sum_t g_{k,n,t})(\sum_t g_{k,n,t})^\top`;

and the layer's block is :math:`B \otimes A` on the row-major weight matrix. :math:`A` is an
average (over all :math:`N` data of all batches and processes), :math:`B` carries the whole
scale of the curvature. :math:`T` is the number of shared positions the layer sees per datum
(its input's positions; the number of output locations of a convolution), which equals the
number of loss terms per datum in the settings where KFAC is exact: a network acting
position-wise with one loss term per position (``expand``: e.g. deep linear networks with
``MSELoss`` on sequences), or positions aggregated before the loss (``reduce``). In those
settings type-2 KFAC equals the exact block-diagonal GGN, for ``"mean"`` and ``"sum"``
reductions, any batching and sequence lengths that differ between batches (:math:`A`
averages over all rows of all batches, :math:`B` is weighted by the loss normalisers).
``num_per_example_loss_terms=T`` overrides the ``expand`` normalisation :math:`1/(NT)` with a
fixed :math:`T` for all layers (e.g. the loss terms of a sequence model whose layers see a
different number of positions); the default infers it per layer. A bias is a weight on a
constant input 1: ``separate_weight_and_bias=False`` appends 1 to :math:`x` (one block for
``[W, b]``), otherwise the bias block is :math:`B \cdot a_b` with the scalar :math:`a_b` the
same average of :math:`1^2` (:math:`a_b = 1` unless :math:`T` is overridden).

Which output factors :math:`s_k` (NOTE [output factors] of :mod:`curvops.losses.likelihood`):
``type-2`` splits the loss Hessian's square root into one column per output position
(:math:`F \cdot P` columns, ``C · T`` for cross-entropy on ``[N, C, T]``), so that
:math:`\sum_k s_k[n] s_k[n]^\top` is the block-diagonal loss Hessian and the factors, the
fallback diagonal and EKFAC's correction are those of the exact GGN (the limit of ``mc``);
``mc`` backpropagates the datum's would-be gradients (cross-position terms vanish in
expectation); ``empirical`` the gradient of the datum's loss. For ``expand``,
:math:`\sum_{n,t} g_{n,t} g_{n,t}^\top` of the latter equals the statistic of one gradient per
*loss term* whenever the network acts position-wise, so KFAC-expand's empirical flavour
approximates the empirical Fisher per loss term (:class:`~curvops.EFLinearOperator`'s default
``gradient_of="loss-term"``), and its fallback diagonal and EKFAC correction use per-loss-term
gradients (split columns); KFAC-reduce's empirical flavour sums a datum's positions before
the outer product and approximates ``gradient_of="datum"``, as do its fallback and correction.

Padding (targets equal to ``ignore_index``) contributes nothing to :math:`B` (its output
factors are zero) and is left out of the average :math:`A`: every input row gets a weight
:math:`m_{n,t} \in [0, 1]` (:func:`input_row_weights`), and all sums and counts of
:math:`A` (and of :math:`a_b`) are weighted sums,
:math:`A = \sum_{n,t} m_{n,t} x_{n,t} x_{n,t}^\top / \sum_{n,t} m_{n,t}`. If the layer's
positions map to the loss positions (the layer has as many rows per batch as there are
targets, e.g. a position-wise network on ``[N, T, d]`` with cross-entropy on ``[N, C, T]``),
:math:`m_{n,t}` is 1 where the target at that position counts and 0 where it is ignored;
otherwise every row of a datum has the datum's share of counting loss terms (1 without
padding, 0 for a fully ignored datum). ``reduce`` averages each datum's rows with these
weights and counts every datum that has a counting loss term once. So padding a batch at
the end gives the same KFAC (and EKFAC) as cutting the padded positions off, for a network
acting position-wise; and the exact settings above stay exact with padding when the loss
Hessian is the same at every counting position (e.g. a single linear layer whose logits do
not depend on its input; cross-entropy has no padding-free exact setting otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from curvops.kronecker.gram import add_gram_upper_, mirror_upper_
from curvops.kronecker.layers import KFACLayer


@dataclass
class LayerFactors:
    r"""The Kronecker factors of one layer (see NOTE [KFAC scaling]).

    The layer's block is :math:`B \otimes A` on the row-major weight matrix (with a last
    column for the bias if ``joint``), plus :math:`a_b B` for a separate bias. How the two
    factors are normalised, for data :math:`n = 1..N` (all batches and processes) with
    :math:`T` rows each (the shared positions; :math:`T = 1` for a plain ``nn.Linear`` on
    vectors) and per-datum (would-be) output gradients :math:`g_{k,n,t}` of the *per-datum*
    loss :math:`\ell_n` (NOTE [loss scaling] of :mod:`curvops.losses`):

    * :attr:`input_factor` :math:`A` is an **average over the rows of all data**,
      :math:`\frac{1}{NT} \sum_{n,t} x_{n,t} x_{n,t}^\top` (``reduce``: over the
      :math:`N` position-averaged rows). It does not depend on the loss.
    * :attr:`gradient_factor` :math:`B` carries the **whole scale of the curvature**: the
      sum over the data of the per-datum outer products
      :math:`\sum_{n,k,t} g_{k,n,t} g_{k,n,t}^\top` (``reduce``: of the sums over the
      positions, :math:`\sum_{n,k} (\sum_t g_{k,n,t})(\sum_t g_{k,n,t})^\top`), times the
      loss' reduction factor
      :math:`R_\mathbb{D}`, i.e. :math:`1` for ``reduction="sum"`` (a sum over the data) and
      :math:`1/(\text{number of loss terms})` for ``reduction="mean"`` (an average).
    * :attr:`bias_input_factor` :math:`a_b` is the same average of the constant input
      :math:`1^2` (so :math:`a_b = 1` unless ``num_per_example_loss_terms`` is fixed).

    The split of the scale between the factors is a convention: :math:`(cB) \otimes (A/c)`
    is the same block. Ask for the split a client needs instead of rescaling by hand:
    :meth:`scaled` multiplies the factors by given numbers, and
    :meth:`~curvops.kronecker.KFACLinearOperator.factors_as_share_of` returns the factors of
    one batch as its additive share of a larger data set (laplace-torch's convention).

    Attributes:
        module_name: The layer's name in the model.
        module_type: The layer's class name.
        weight_name: Name of the weight in the operator's parameters, or ``None``.
        bias_name: Name of the bias in the operator's parameters, or ``None``.
        joint: Whether weight and bias share one block (``input_factor`` then has a last
            row and column for the bias' constant input).
        input_factor: :math:`A`, ``[d_in(+1), d_in(+1)]``; for ``nn.Embedding`` the diagonal
            of :math:`A`, ``[num_embeddings]``; ``None`` without a weight.
        gradient_factor: :math:`B`, ``[d_out, d_out]``.
        bias_input_factor: :math:`a_b` (a 0-dim tensor) for a separate bias block, else
            ``None``.
    """

    module_name: str
    module_type: str
    weight_name: str | None
    bias_name: str | None
    joint: bool
    input_factor: Tensor | None
    gradient_factor: Tensor
    bias_input_factor: Tensor | None

    @property
    def diagonal_input(self) -> bool:
        """Whether :attr:`input_factor` holds a diagonal (``nn.Embedding``)."""
        return self.input_factor is not None and self.input_factor.ndim == 1

    def scaled(self, *, input_scale: float = 1.0, gradient_scale: float = 1.0) -> LayerFactors:
        r"""New factors :math:`(\gamma B, \alpha A, \alpha a_b)`, blocks times :math:`\alpha\gamma`.

        Args:
            input_scale: :math:`\alpha`, multiplies :attr:`input_factor` and
                :attr:`bias_input_factor`.
            gradient_scale: :math:`\gamma`, multiplies :attr:`gradient_factor`.

        Returns:
            New factors (fresh tensors; these are unchanged).

        Raises:
            ValueError: If a scale is not a finite non-negative number (the factors are
                positive semi-definite).

        Examples:
            >>> import torch
            >>> f = LayerFactors("fc", "Linear", "fc.weight", None, False,
            ...                  torch.eye(2), 3 * torch.eye(1), None)
            >>> g = f.scaled(input_scale=2.0, gradient_scale=0.5)
            >>> g.input_factor[0, 0].item(), g.gradient_factor.item()
            (2.0, 1.5)
        """
        for name, value in (("input_scale", input_scale), ("gradient_scale", gradient_scale)):
            value = float(value)
            if not (value >= 0 and value != float("inf")):
                raise ValueError(
                    f"{name} must be a finite non-negative number (the factors are positive "
                    f"semi-definite), got {value}."
                )

        def times(t: Tensor | None, c: float) -> Tensor | None:
            return None if t is None else t * c

        return replace(
            self,
            input_factor=times(self.input_factor, input_scale),
            gradient_factor=self.gradient_factor * gradient_scale,
            bias_input_factor=times(self.bias_input_factor, input_scale),
        )

    def tensors(self) -> dict[str, Tensor]:
        """The factor tensors by name (for ``state_dict``), leaving out absent ones."""
        out = {"gradient_factor": self.gradient_factor}
        if self.input_factor is not None:
            out["input_factor"] = self.input_factor
        if self.bias_input_factor is not None:
            out["bias_input_factor"] = self.bias_input_factor
        return out


def input_rows(layer: KFACLayer, inputs: tuple) -> Tensor:
    """Input rows ``[N, T, d]`` of a layer, with a column of ones appended for a bias.

    For an embedding, returns its token ids ``[N, T]``.
    """
    x = layer.input_rows(inputs)
    if layer.diagonal_input:
        return x
    parts = [x] if layer.weight_index is not None else []
    if layer.bias_index is not None:
        parts.append(torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device))
    return torch.cat(parts, dim=-1)


def input_row_weights(
    term_mask: Tensor | None, N: int, T: int, dtype: torch.dtype | None
) -> Tensor | None:
    """Weights ``[N, T]`` of a layer's input rows from the batch's loss-term mask.

    See NOTE [KFAC scaling]: a row at a layer position that maps to a loss position counts
    if that loss term does (the mask holds ``N * T`` entries); otherwise every row of a
    datum has the datum's share of counting loss terms (the mask has ``N`` rows); a layer
    whose batch axis differs from the targets' gets no weights.

    Args:
        term_mask: ``[N', *positions]`` boolean mask, or ``None`` if every term counts.
        N: The layer's number of data.
        T: The layer's number of positions per datum.
        dtype: Floating dtype of the weights (``None``: float64 for token counts).

    Returns:
        The weights, or ``None`` if all are one.
    """
    if term_mask is None:
        return None
    mask = term_mask.to(dtype or torch.float64)
    if mask.numel() == N * T:
        return mask.reshape(N, T)
    if mask.shape[0] == N:
        return mask.reshape(N, -1).mean(dim=1, keepdim=True).expand(N, T)
    return None


def layer_row_weights(
    layer: KFACLayer, inputs: tuple, term_mask: Tensor | None, N: int, dtype: torch.dtype | None
) -> Tensor | None:
    """Weights ``[N, T]`` of a layer's input rows, call by call (NOTE [weight sharing]).

    Each call's rows get :func:`input_row_weights` with that call's number of positions, so
    that the calls of a shared weight map their positions to the loss positions alike; if
    instead the calls together have as many rows as there are loss positions (e.g. a layer
    called once per position), the concatenated rows map to the loss positions in order.

    Args:
        layer: The layer.
        inputs: Its inputs of the batch.
        term_mask: ``[N', *positions]`` boolean mask, or ``None`` if every term counts.
        N: The layer's number of data.
        dtype: Floating dtype of the weights (``None``: float64 for token counts).

    Returns:
        The weights of the concatenated rows, or ``None`` if all are one.
    """
    if term_mask is None:
        return None
    counts = layer.positions_per_call(inputs)
    total = sum(counts)
    if term_mask.numel() == N * total and any(term_mask.numel() != N * T for T in counts):
        # the calls together see the loss positions (e.g. one call per position)
        return input_row_weights(term_mask, N, total, dtype)
    parts = [input_row_weights(term_mask, N, T, dtype) for T in counts]
    if len(parts) == 1 or all(p is None for p in parts):
        return parts[0] if len(parts) == 1 else None
    like = next(p for p in parts if p is not None)
    return torch.cat(
        [like.new_ones(N, T) if p is None else p for p, T in zip(parts, counts)], dim=1
    )


def _position_means(x: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """KFAC-reduce's rows: each datum's (weighted) mean over its positions, and datum weights.

    Args:
        x: Input rows ``[N, T, d]``.
        weights: Row weights ``[N, T]`` (:func:`input_row_weights`) or ``None``.

    Returns:
        Rows ``[N, d]`` (a view for ``T = 1`` without weights) and weights ``[N]``: 1 for a
        datum with a counting position, 0 for a fully ignored one or one without positions
        (``T = 0``, e.g. empty sequences); ``None`` without weights and ``T > 0``.
    """
    if x.shape[1] == 0:  # no positions: no mean (not 0 / 0), and the data do not count
        return x.new_zeros(x.shape[0], x.shape[2]), x.new_zeros(x.shape[0])
    if weights is None:
        return (x[:, 0] if x.shape[1] == 1 else x.mean(dim=1)), None
    totals = weights.sum(dim=1)
    counted = totals > 0
    means = (x * weights.unsqueeze(-1)).sum(dim=1) / torch.where(counted, totals, 1).unsqueeze(-1)
    return means, counted.to(x.dtype)


class FactorAccumulator:
    """Sums of one layer's KFAC statistics over the batches of a pass.

    The input factor's sum is kept in parts (weight block, bias column, number of rows), each
    a contiguous accumulator updated in place (the Gram sums as in NOTE [upper-triangular
    Gram sums] of :mod:`curvops.kronecker.gram`); :meth:`finalize` assembles them.

    Args:
        layer: The layer.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_terms: Fixed :math:`T` for the ``expand`` normalisation, or ``None`` to count
            the layer's positions.
        backward: Whether gradient factors are accumulated (not for ``forward-only``).
    """

    def __init__(self, layer: KFACLayer, kfac_approx: str, loss_terms: int | None, backward: bool):
        self.layer = layer
        self.reduce = kfac_approx == "reduce"
        self.loss_terms = loss_terms
        self.backward = backward
        like = {"dtype": layer.dtype, "device": layer.device}
        d_out, d_in = layer.weight_matrix_shape
        self.has_weight = layer.weight_index is not None
        self.has_bias = layer.bias_index is not None
        # sum of x x^T (the token counts, a diagonal, for an embedding)
        self.A_sum: Tensor | None = None
        if self.has_weight:
            shape = (d_in,) if layer.diagonal_input else (d_in, d_in)
            self.A_sum = torch.zeros(shape, **like)
        # sum of x (the bias' constant input times x) and number of rows (1 times 1)
        joint_part = self.has_weight and self.has_bias and not layer.diagonal_input
        self.bias_column_sum = torch.zeros(d_in, **like) if joint_part else None
        self.num_rows = torch.zeros((), **like) if self.has_bias else None
        self.B_sum = torch.zeros(d_out, d_out, **like) if backward else None
        self.count = torch.zeros((), **like)
        self.feature_order: Tensor | None = None
        # the counts are summed in Python per batch and written by flush_counts()
        self._num_rows, self._count = 0, 0

    def add(
        self,
        inputs: tuple,
        grad_output: Tensor | None,
        weight: float,
        *,
        with_inputs: bool = True,
        term_mask: Tensor | None = None,
    ) -> None:
        """Add one batch's contribution.

        Args:
            inputs: The layer's positional inputs.
            grad_output: Output gradients ``[K, *output.shape]`` (``None``: forward-only, or
                a chunk without layer gradients).
            weight: The batch weight :math:`w_\\mathbb{B}`.
            with_inputs: Add the input statistics (and counts) too; ``False`` for the further
                chunks of output factors of the same batch (NOTE [chunks of output factors]
                in :mod:`curvops.kronecker.collection`).
            term_mask: Which loss terms of the batch count, ``[N, *positions]`` (``None``:
                all), for the input statistics (NOTE [KFAC scaling]).
        """
        if with_inputs:
            self._add_inputs(inputs, term_mask)
        if self.backward and grad_output is not None:
            g = self.layer.grad_rows(grad_output)  # [K, N, T, d_out]
            if self.reduce:  # sums over the positions (a view for one position)
                g = g[:, :, 0] if g.shape[2] == 1 else g.sum(dim=2)
            add_gram_upper_(self.B_sum, g, alpha=weight)

    def _add_inputs(self, inputs: tuple, term_mask: Tensor | None = None) -> None:
        """Add one batch's input statistics and counts (weighted rows, NOTE [KFAC scaling])."""
        layer = self.layer
        if layer.diagonal_input:
            x = layer.input_rows(inputs)  # token ids [N, T]
        else:
            # [N, T, d_in], features possibly permuted (undone in finalize)
            x, self.feature_order = layer.factor_input_rows(inputs)
        N = x.shape[0]
        weights = layer_row_weights(
            layer, inputs, term_mask, N, x.dtype if x.is_floating_point() else None
        )
        if layer.diagonal_input:
            self.A_sum.add_(self._token_counts(x, weights))
        else:
            # rows of the (averaged) inputs; a bias appends a constant 1 to every row, whose
            # blocks of A are the column sums and the number of rows (no concatenated copy)
            rows = x  # [N, T, d_in], or [N, d_in] averaged over the positions (a view if T = 1)
            if self.reduce:
                rows, weights = _position_means(x, weights)
            scaled = rows if weights is None else rows * weights.sqrt().unsqueeze(-1)
            if self.has_weight:
                add_gram_upper_(self.A_sum, scaled)
            if self.bias_column_sum is not None:
                weighted = rows if weights is None else rows * weights.unsqueeze(-1)
                self.bias_column_sum.add_(weighted.sum(dim=tuple(range(rows.ndim - 1))))
        # (weighted) numbers of rows and of data
        T = x.shape[1]
        if T == 0:  # data without positions (empty sequences) have no loss terms to count
            rows_count = data_count = 0
        elif weights is None:
            rows_count = N if self.reduce else N * T
            data_count = N
        else:
            rows_count = float(weights.sum())
            data_count = rows_count if self.reduce else float(weights.mean(dim=1).sum())
        if not layer.diagonal_input:
            self._num_rows += rows_count
        if self.reduce or self.loss_terms is None:
            self._count += rows_count
        else:
            self._count += data_count * self.loss_terms

    def _token_counts(self, ids: Tensor, weights: Tensor | None) -> Tensor:
        layer = self.layer
        flat = ids.reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        if layer.padding_idx is not None:
            keep = flat != layer.padding_idx
            flat = flat[keep]
            w = None if w is None else w[keep]
        counts = torch.bincount(flat, weights=w, minlength=layer.num_embeddings)
        return counts.to(dtype=layer.dtype)

    def flush_counts(self) -> None:
        """Write the counts summed so far into their tensors (before these are reduced)."""
        self.count.fill_(self._count)
        if self.num_rows is not None:
            self.num_rows.fill_(self._num_rows)

    def tensors(self) -> list[Tensor]:
        """The accumulators (zero-initialised; to be summed across processes in place).

        Call :meth:`flush_counts` after the last batch, before they are summed.
        """
        parts = (self.A_sum, self.bias_column_sum, self.num_rows, self.B_sum, self.count)
        return [t for t in parts if t is not None]

    def _weight_input_factor_sum(self) -> Tensor:
        """The weight's input factor sum in the weight's feature order (or the token counts)."""
        if self.layer.diagonal_input:
            return self.A_sum
        A = mirror_upper_(self.A_sum)
        if self.feature_order is None:
            return A
        inverse = torch.argsort(self.feature_order)
        return A[inverse][:, inverse]

    def _joint_input_factor_sum(self) -> Tensor:
        """Assemble the joint block's input factor sum, with a last row/column for the bias."""
        A = self._weight_input_factor_sum()
        column = self.bias_column_sum
        if self.feature_order is not None:
            column = column[torch.argsort(self.feature_order)]
        d = A.shape[0]
        full = A.new_empty(d + 1, d + 1)
        full[:d, :d] = A
        full[:d, d] = column
        full[d, :d] = column
        full[d, d] = self.num_rows
        return full

    def finalize(self, separate_weight_and_bias: bool, names: dict[int, str]) -> LayerFactors:
        """Turn the sums into the layer's factors.

        Args:
            separate_weight_and_bias: Whether the bias gets its own block.
            names: Parameter names by position in the parameter list.

        Returns:
            The layer's factors. They may share memory with the accumulated sums, which are
            not to be used afterwards.
        """
        layer = self.layer
        if self.backward:
            B = mirror_upper_(self.B_sum)
        else:
            d_out = layer.weight_matrix_shape[0]
            B = torch.eye(d_out, dtype=self.count.dtype, device=self.count.device)
        joint = self.has_weight and self.has_bias and not separate_weight_and_bias
        input_factor, bias_input_factor = None, None
        if joint:
            # in place: the sums are not used after this (a fresh result costs page faults)
            input_factor = self._joint_input_factor_sum().div_(self.count)
        else:
            if self.has_weight:
                input_factor = self._weight_input_factor_sum().div_(self.count)
            if self.has_bias:
                bias_input_factor = self.num_rows / self.count
        return LayerFactors(
            module_name=layer.name,
            module_type=layer.type_name,
            weight_name=names.get(layer.weight_index),
            bias_name=names.get(layer.bias_index),
            joint=joint,
            input_factor=input_factor,
            gradient_factor=B,
            bias_input_factor=bias_input_factor,
        )
