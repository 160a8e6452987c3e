r"""Dense GGN-type matrices as Gram matrices of per-datum gradients.

NOTE [dense Gram matrices]: on one batch, the GGN, the empirical and the Monte-Carlo Fisher
are :math:`C_\mathbb{B} = \sum_r J_r^\top M_r J_r` with
:math:`M_r = \sum_k c_{k,r}\, u_k[r] u_k[r]^\top` (NOTE [exact diagonals] of
:mod:`curvops.curvature.diagonals`), so with the per-row gradient columns
:math:`g_{k,r} = J_r^\top u_k[r]`

.. math::
    C_\mathbb{B} = \sum_r \sum_k c_{k,r}\, g_{k,r} g_{k,r}^\top = G^\top \operatorname{diag}(c)
    \, G, \qquad G = [g_{k,r}]_{(k,r)} \in \mathbb{R}^{N K T \times D}.

The per-datum gradients are the diagonal's (same columns, same ``vmap`` over the data, same
check that a datum's output is its rows of the batch output); only their reduction differs:
one matrix product per chunk of data instead of a sum of squares. Cost: about :math:`K T`
gradients for the columns plus :math:`N K T D^2` multiply-adds for the product, against
:math:`D` matrix-vector products (each about :math:`3 N D` multiply-adds on an MLP, plus the
per-pass overhead) for ``A @ I``. It wins when the columns per datum are few: the empirical
Fisher of data without positions (one column per datum), the MC Fisher with few samples,
the GGN of few outputs. Measured on the MLP 64-32-10 (D = 2,410, 128 data, one thread): see
:data:`GRAM_MAX_COLUMNS_PER_DATUM`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from curvops.curvature.attention import differentiable_attention
from curvops.curvature.diagonals import (
    Forward,
    _as_batch_of_one,
    _check_rows,
    _Columns,
    _data_axes,
    _has_data_axis,
    _slice_data,
)

GRAM_MAX_COLUMNS_PER_DATUM = 8
"""Most factor columns per datum (:math:`K T`) for which ``to_dense()`` forms the Gram
matrix of per-datum gradients instead of ``D`` products (NOTE [dense Gram matrices]):
8 columns per datum took about as long either way on the D = 2,410 MLP, 10 (the GGN of 10
classes) 1.4x longer by the Gram matrix there (0.45 s vs 0.31 s, 256 data, one thread)."""

GRAM_MAX_COLUMN_ENTRIES = 8 * 2410
"""More columns per datum still take the Gram matrix while columns per datum times ``D`` stay
below this: on small operators the per-pass overhead of ``D`` products dominates (the GGN of
10 classes of a last layer with D = 330, 256 data, one thread: 13.6 ms by the Gram matrix,
32.7 ms by the products; D = 650: 30.3 vs 42.4 ms) — last-layer Laplace's ``"full"``."""


def batch_gram(
    forward: Forward,
    params: list[Tensor],
    X: Any,
    batch_size: int,
    factors_of_output: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    out: Tensor,
    *,
    alpha: float = 1.0,
    memory_budget: int,
    max_columns_per_datum: int | None = None,
) -> bool:
    r"""Add ``alpha`` :math:`G^\top \operatorname{diag}(c) G` of one batch to ``out`` ``[D, D]``.

    See NOTE [dense Gram matrices].

    Args:
        forward: ``(params, X) -> output`` of the batch.
        params: Parameter values.
        X: The input batch (a tensor, or a mapping/sequence of tensors).
        batch_size: Number of data :math:`N` in ``X``.
        factors_of_output: As for :func:`curvops.curvature.diagonals.batch_diagonal`.
            Called once (for the MC Fisher: one draw).
        out: The dense accumulator ``[D, D]`` (flattening convention of the parameters).
        alpha: Scale of the batch's matrix.
        memory_budget: Bytes of per-datum gradients formed at once.
        max_columns_per_datum: If the batch has more columns per datum (and their count
            times ``D`` exceeds :data:`GRAM_MAX_COLUMN_ENTRIES`), nothing is added and
            ``False`` is returned (the caller multiplies with the identity instead); the
            factors were drawn all the same. Default :data:`GRAM_MAX_COLUMNS_PER_DATUM`.

    Returns:
        Whether the batch's matrix was added (``False``, with nothing added, also for
        outputs whose rows are not those of single data).

    Raises:
        ValueError: If the per-datum outputs of a later chunk of data differ from the batch
            output (the first chunk's are checked before anything is added).
    """
    N = batch_size
    template = X
    X, dims = _data_axes(X, N)
    params = [p.detach() for p in params]
    with torch.no_grad():
        output = forward(params, template)
    R = output.shape[0] if output.ndim else 0
    if R == 0 or R % N != 0 or not _has_data_axis(dims):
        return False  # not a sum over data with its own rows: the products handle it
    factors, coefficients = factors_of_output(output)
    columns = _Columns(factors, coefficients, N)
    if max_columns_per_datum is None:
        max_columns_per_datum = GRAM_MAX_COLUMNS_PER_DATUM
    D = out.shape[0]
    if columns.count > max_columns_per_datum and columns.count * D > GRAM_MAX_COLUMN_ENTRIES:
        return False
    if columns.count == 0:
        return True
    k, t = columns.chunks(columns.count)[0]
    per_datum_bytes = 2 * columns.count * D * output.element_size()
    n_chunk = max(1, min(N, memory_budget // per_datum_bytes))

    def datum_output(p: tuple[Tensor, ...], x: Any) -> Tensor:
        return forward(list(p), _as_batch_of_one(x, dims, template))

    def per_datum(x: Any, s: Tensor) -> tuple[Tensor, Tensor]:
        y, vjp_fn = vjp(lambda *p: datum_output(p, x), *params)
        u = columns.place(s[k, t], t)  # factor k on row t of the datum: [C, T, ...]
        grads = vmap(vjp_fn)(u.reshape(len(k), *y.shape))
        return torch.cat([g.reshape(len(k), -1) for g in grads], dim=1), y  # [C, D]

    batched = vmap(per_datum, in_dims=(dims, 0), randomness="error")
    rows_out = output.reshape(N, columns.T, *columns.rest)
    with torch.no_grad(), differentiable_attention():
        for start in range(0, N, n_chunk):
            rows = slice(start, min(start + n_chunk, N))
            G, y = batched(_slice_data(X, dims, rows), columns.S[rows])
            try:
                _check_rows(y, rows_out[rows], columns.T)
            except ValueError:
                if start > 0:
                    raise
                return False  # rows that depend on other data: the products handle them
            G = G.reshape(-1, D)  # [n C, D]
            left = G
            if columns.c is not None:
                left = G * columns.c[rows][:, k, t].reshape(-1, 1)
            out.addmm_(left.T, G, alpha=alpha)
    return True
