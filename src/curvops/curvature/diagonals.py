r"""Pure per-batch functions for the exact diagonals of the GGN and the Fishers.

NOTE [exact diagonals]: on one batch, the GGN, the empirical and the Monte-Carlo Fisher
are :math:`C_\mathbb{B} = \sum_r J_r^\top M_r J_r` summed over the rows :math:`r` of the
model output (its leading axis), with :math:`J_r` the Jacobian of row :math:`r` w.r.t. the
parameters and :math:`M_r` an output-space matrix given by factor columns,
:math:`M_r = \sum_k c_{k,r}\, u_k[r] u_k[r]^\top` (:math:`c = 1` for the Fishers' factors of
:meth:`curvops.losses.LossSpec.output_factors`; eigenvalues of the loss Hessian for the
GGN, see :func:`loss_hessian_factors`). Hence

.. math::
    \operatorname{diag}(C_\mathbb{B}) = \sum_r \sum_k c_{k,r}\,
    \bigl(J_r^\top u_k[r]\bigr)^{\odot 2},

a sum of squared per-row gradients: one backpropagated column per factor and row, instead
of :math:`D` products with unit vectors. The per-row gradients come from per-*datum*
gradients, evaluated for all data at once with ``torch.func.vmap`` over the leading axis
of the input (the per-example-gradient trick; the model sees one datum at a time). A
datum owns :math:`T = R / N` consecutive output rows (``T = 1`` for most models; the
``T`` positions of a sequence model whose output is flattened to ``[N T, C]``); its
columns are the factor columns of each of its rows, placed on that row alone, so the
cost is :math:`K T` backpropagated columns per datum, about :math:`K T` gradients
(:math:`K` the number of factor columns per row). The datum's output is checked against
the batch output, so a model whose output rows depend on other data (e.g. BatchNorm in
training mode) raises instead of giving a wrong diagonal. Parameters of ``nn.Linear``
layers that see one input row per datum skip the per-datum gradients: NOTE [linear closed
form] of :mod:`curvops.curvature.diagonal_linear` sums their squares with one matrix product
per chunk of columns, from one backward pass of the whole batch.

Memory: the per-datum gradients of a chunk of data and columns are formed at once, at
most ``memory_budget`` bytes of them (default :data:`DIAGONAL_MEMORY_BUDGET`), and at most
:data:`DIAGONAL_COLUMN_CHUNK` columns per vectorised backward pass.

References:
    Schraudolph, N. N. (2002). Fast curvature matrix-vector products for second-order
    gradient descent.
    Dangel, F., Kunstner, F., Hennig, P. (2020). BackPACK: Packing more into backprop
    (the exact GGN diagonal from a symmetric factorisation of the loss Hessian).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from math import prod
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap
from tqdm.auto import tqdm

from curvops.curvature.attention import differentiable_attention
from curvops.curvature.diagonal_linear import LinearUse, allclose, linear_diagonal, recording
from curvops.curvature.products import loss_hessian_matmat

DIAGONAL_MEMORY_BUDGET = 2**28
"""Bytes of per-datum gradients formed at once by :func:`batch_diagonal` (256 MiB)."""

DIAGONAL_COLUMN_CHUNK = 32
"""Most factor columns per datum backpropagated by one vectorised pass."""

Forward = Callable[[tuple[Tensor, ...], Any], Tensor]


# ==================================================================== output-space factors
def loss_hessian_factors(
    loss_of_output: Callable[[Tensor], Tensor], output: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Eigen-factors of the per-row loss Hessians, for any twice-differentiable loss.

    The Hessian of the batch loss w.r.t. the output is block-diagonal over the output rows
    for every loss that sums (or averages) per-datum terms. Its blocks
    :math:`H_r \in \mathbb{R}^{M \times M}` (:math:`M` entries per row) are read off by
    :math:`M` Hessian-vector products in output space with the :math:`m`-th unit vector on
    every row at once, then :math:`H_r = V_r \operatorname{diag}(\lambda_r) V_r^\top`
    (``torch.linalg.eigh``). Eigenvalues may be negative (a non-convex loss); columns whose
    eigenvalue vanishes on every row (up to round-off, e.g. the softmax direction of the
    cross-entropy) are dropped.

    Args:
        loss_of_output: Maps the model output to the scalar batch loss.
        output: The (detached) model output ``[R, ...]``.

    Returns:
        The columns ``U`` ``[K, *output.shape]`` and coefficients ``c`` ``[K, R]`` with
        :math:`H_r = \sum_k c_{k,r} u_k[r] u_k[r]^\top`.

    Raises:
        ValueError: If the output has no leading axis, or the loss couples different rows
            (its Hessian is not block-diagonal over them).
    """
    if output.ndim == 0:
        raise ValueError("The model output is a scalar; diagonal() needs a leading data axis.")
    R, M = output.shape[0], prod(output.shape[1:])
    like = {"dtype": output.dtype, "device": output.device}
    matmat = loss_hessian_matmat(loss_of_output)
    eye = torch.eye(M, **like).reshape(M, 1, M).expand(M, R, M)
    H = matmat(output, eye.reshape(M, *output.shape)).reshape(M, R, M).permute(1, 2, 0)
    H = 0.5 * (H + H.transpose(1, 2))  # [R, M, M]
    # a random probe detects a loss whose Hessian couples rows (not a sum over data)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(R, M, generator=gen, dtype=output.dtype).to(output.device)
    Hv = matmat(output, v.reshape(1, *output.shape)).reshape(R, M)
    blockwise = torch.einsum("rij,rj->ri", H, v)
    if not allclose(blockwise, Hv):
        raise ValueError(
            "The loss couples different rows of the model output (its Hessian w.r.t. the "
            "output is not block-diagonal over the data), so the GGN is not a sum of per-datum "
            "terms and diagonal() cannot compute it from per-datum gradients. Use "
            "hutchinson_diag or xdiag on the operator instead."
        )
    lam, V = torch.linalg.eigh(H)  # lam [R, M], V [R, M(entry), M(column)]
    scale = float(lam.abs().max()) if lam.numel() else 0.0
    keep = lam.abs().amax(dim=0) > M * torch.finfo(output.dtype).eps * scale
    U = V[:, :, keep].permute(2, 0, 1)  # [K, R, M]
    return U.reshape(U.shape[0], *output.shape), lam[:, keep].T


# ==================================================================== inputs under vmap
def _data_axes(X: Any, N: int) -> tuple[Any, Any]:
    """``X`` with mappings as dicts, and its ``in_dims`` for ``vmap`` over ``N`` data.

    Tensors whose leading axis has length ``N`` are split over the data; anything else
    (other tensors, non-tensors) is passed to every datum as is.
    """
    if isinstance(X, Tensor):
        return X, 0 if X.ndim > 0 and X.shape[0] == N else None
    if isinstance(X, Mapping):
        parts = {k: _data_axes(v, N) for k, v in X.items()}
        return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
    if isinstance(X, (list, tuple)):
        parts = [_data_axes(v, N) for v in X]
        return type(X)(p[0] for p in parts), type(X)(p[1] for p in parts)
    return X, None


def _as_batch_of_one(x: Any, dims: Any, template: Any) -> Any:
    """Give the per-datum slices (``dims == 0``) of ``x`` a leading axis of length 1.

    Mappings get the type of ``template`` (the batch input) back where its constructor takes
    a dict (e.g. a HuggingFace ``BatchEncoding``).
    """
    if isinstance(dims, dict):
        d = {k: _as_batch_of_one(x[k], dk, template[k]) for k, dk in dims.items()}
        if type(template) is not dict:
            with contextlib.suppress(Exception):
                return type(template)(d)
        return d
    if isinstance(dims, (list, tuple)):
        return type(dims)(_as_batch_of_one(v, d, t) for v, d, t in zip(x, dims, template))
    return x.unsqueeze(0) if dims == 0 else x


def _slice_data(X: Any, dims: Any, rows: slice) -> Any:
    if isinstance(dims, dict):
        return {k: _slice_data(X[k], d, rows) for k, d in dims.items()}
    if isinstance(dims, (list, tuple)):
        return type(dims)(_slice_data(v, d, rows) for v, d in zip(X, dims))
    return X[rows] if dims == 0 else X


# ==================================================================== columns
class _Columns:
    """The backpropagated columns of a batch: factor ``k`` placed on row ``t`` of a datum.

    Args:
        factors: ``[K, R, ...]`` with ``R = N T``.
        coefficients: ``[K, R]`` or ``None``.
        N: Number of data.
    """

    def __init__(self, factors: Tensor, coefficients: Tensor | None, N: int):
        K, R = factors.shape[0], factors.shape[1]
        self.N, self.T, self.K = N, R // N, K
        self.factors, self.coefficients = factors, coefficients
        self.rest = tuple(factors.shape[2:])
        self.S = factors.reshape(K, N, self.T, *self.rest).movedim(1, 0)  # [N, K, T, ...]
        self.c = None
        if coefficients is not None:
            self.c = coefficients.reshape(K, N, self.T).movedim(1, 0)  # [N, K, T]
        self.mask = torch.eye(self.T, dtype=factors.dtype, device=factors.device)

    @property
    def count(self) -> int:
        """Columns per datum, :math:`K T`."""
        return self.K * self.T

    def chunks(self, size: int) -> list[tuple[Tensor, Tensor]]:
        """Index chunks ``(k, t)`` of at most ``size`` columns."""
        j = torch.arange(self.count, device=self.S.device)
        k, t = j // self.T, j % self.T
        return [(k[s : s + size], t[s : s + size]) for s in range(0, self.count, size)]

    def place(self, u: Tensor, t: Tensor) -> Tensor:
        """Factor values ``u`` ``[C, ...]`` of rows ``t`` -> ``[C, T, ...]`` on those rows."""
        if self.T == 1:
            return u.unsqueeze(1)
        return self.mask[t].reshape(len(t), self.T, *([1] * len(self.rest))) * u.unsqueeze(1)

    def batch_chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Whole-batch cotangents ``[C, R, ...]`` and coefficients ``[C, N]`` per chunk."""
        if self.T == 1 and size >= self.K:  # one chunk of the factors as they are
            yield self.factors, self.coefficients
            return
        for k, t in self.chunks(size):
            u = self.S[:, k, t].movedim(1, 0)  # [C, N, ...]
            u = self.place(u.reshape(len(k) * self.N, *self.rest), t.repeat_interleave(self.N))
            c = None if self.c is None else self.c[:, k, t].T
            yield u.reshape(len(k), self.N * self.T, *self.rest), c


# ==================================================================== the diagonal
def _chunk_sizes(N: int, J: int, D: int, itemsize: int, budget: int) -> tuple[int, int]:
    """Data and columns per vectorised pass, so that their gradients fit ``budget``."""
    per_pair = 3 * max(D, 1) * itemsize  # a gradient, its square and a temporary
    columns = max(1, min(J, DIAGONAL_COLUMN_CHUNK, budget // per_pair))
    data = max(1, min(N, budget // (per_pair * columns)))
    return data, columns


def batch_diagonal(
    forward: Forward,
    params: list[Tensor],
    X: Any,
    batch_size: int,
    factors_of_output: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    *,
    linear: list[LinearUse] | None = None,
    out: list[Tensor] | None = None,
    alpha: float = 1.0,
    memory_budget: int = DIAGONAL_MEMORY_BUDGET,
    progressbar: bool = False,
    row_wise: bool = False,
) -> list[Tensor]:
    r"""Add ``alpha`` :math:`\sum_r \sum_k c_{k,r} (J_r^\top u_k[r])^{\odot 2}` to ``out``.

    See NOTE [exact diagonals]. Parameters of the layers in ``linear`` that qualify for
    NOTE [linear closed form] of :mod:`curvops.curvature.diagonal_linear` get it; all others
    get per-datum gradients.

    Args:
        forward: ``(params, X) -> output`` of the batch.
        params: Parameter values.
        X: The input batch (a tensor, or a mapping/sequence of tensors).
        batch_size: Number of data :math:`N` in ``X`` (the leading axis of its tensors).
        factors_of_output: Maps the (detached) batch output ``[R, ...]`` (``R`` a multiple
            of ``N``) to the factor columns ``[K, R, ...]`` and their coefficients ``[K, R]``
            (or ``None`` for ones). Called once.
        linear: ``nn.Linear`` layers of the model eligible for the closed form
            (:func:`curvops.curvature.diagonal_linear.linear_layers`).
        out: Accumulators shaped like ``params`` (new zeros if ``None``), updated in place.
        alpha: Scale of the batch's diagonal.
        memory_budget: Bytes of per-datum gradients formed at once.
        progressbar: Show a progress bar over the chunks of columns.
        row_wise: The model is row-wise (:func:`curvops.curvature.diagonal_linear.row_wise`):
            the closed form's safeguards are skipped for an input tensor with a data axis
            and one more (NOTE [row-wise models]).

    Returns:
        ``out``.

    Raises:
        ValueError: If the output rows are not a multiple of the data, or the per-datum
            outputs differ from the batch output (rows that depend on other data).
    """
    if out is None:
        out = [torch.zeros_like(p) for p in params]
    N = batch_size
    template = X
    X, dims = _data_axes(X, N)
    if not _has_data_axis(dims):
        raise ValueError(
            f"No tensor in the input has a leading axis of the batch size {N}, so diagonal() "
            "cannot split the batch into data."
        )
    leaves = [p.detach().requires_grad_(bool(linear)) for p in params]
    with contextlib.ExitStack() as stack:
        if linear:  # the graph to the layers' outputs, for the closed form
            stack.enter_context(recording(linear))
            stack.enter_context(torch.enable_grad())
        else:
            stack.enter_context(torch.no_grad())
        output = forward(leaves, template)
    R = output.shape[0] if output.ndim else 0
    if R == 0 or R % N != 0:
        raise ValueError(
            f"The model output has shape {tuple(output.shape)} for a batch of {N} data; "
            "diagonal() needs a leading axis of the output with a multiple of the batch size "
            "(each datum owning the same number of consecutive rows)."
        )
    if output.numel() == 0:  # no output entries (sequences of length 0): no loss terms
        for use in linear or []:
            use.x = use.z = None  # free the graph
        return out
    factors, coefficients = factors_of_output(output.detach())
    columns = _Columns(factors, coefficients, N)
    # NOTE [row-wise models] of curvops.curvature.diagonal_linear
    trusted = row_wise and isinstance(template, Tensor) and template.ndim >= 2
    done: set[int] = set()
    if linear and columns.count:
        size = min(columns.count, DIAGONAL_COLUMN_CHUNK)
        with torch.no_grad():
            chunks = columns.batch_chunks(size)
            done = linear_diagonal(linear, output, leaves, chunks, N, out, alpha, row_wise=trusted)
    for use in linear or []:
        use.x = use.z = None  # free the graph
    output = output.detach()
    rest = [i for i in range(len(params)) if i not in done]
    if trusted and not rest:  # NOTE [row-wise models]: no per-datum pass, not even a check
        return out
    _per_datum_pass(
        forward,
        leaves,
        rest,
        (X, dims, template),
        output,
        columns,
        out,
        alpha,
        memory_budget,
        progressbar,
    )
    return out


def _per_datum_pass(
    forward: Forward,
    params: list[Tensor],
    indices: list[int],
    inputs: tuple[Any, Any, Any],
    output: Tensor,
    columns: _Columns,
    out: list[Tensor],
    alpha: float,
    memory_budget: int,
    progressbar: bool,
) -> None:
    """Squared per-datum gradients of ``params[indices]`` by ``vmap`` over the data.

    Also checks that the per-datum outputs are the batch output's rows (for every
    parameter, even with no ``indices``: the closed form relies on it too). ``inputs`` are
    the input batch split for ``vmap``, its ``in_dims`` and the batch input itself.
    """
    N, T = columns.N, columns.T
    X, dims, template = inputs
    params = [p.detach() for p in params]
    chosen = [params[i] for i in indices] if columns.count else []
    D = sum(p.numel() for p in chosen)
    n_chunk, k_chunk = _chunk_sizes(N, columns.count, D, output.element_size(), memory_budget)
    if not chosen:
        n_chunk = N
    chunks = columns.chunks(k_chunk) if chosen else []

    def datum_output(sub: tuple[Tensor, ...], x: Any) -> Tensor:
        full = list(params)
        for i, v in zip(indices, sub):
            full[i] = v
        return forward(full, _as_batch_of_one(x, dims, template))

    def per_datum(x: Any, s: Tensor, cs: Tensor | None) -> tuple[list[Tensor], Tensor]:
        if not chosen:
            return [], datum_output((), x)
        y, vjp_fn = vjp(lambda *p: datum_output(p, x), *chosen)
        sums: list = [None] * len(chosen)
        for k, t in tqdm(chunks, disable=not progressbar, leave=False, desc="diagonal columns"):
            u = columns.place(s[k, t], t)  # factor k on row t of the datum: [C, T, ...]
            grads = vmap(vjp_fn)(u.reshape(len(k), *y.shape))
            weight = None if cs is None else cs[k, t]
            for i, g in enumerate(grads):
                sq = g.square()
                if weight is not None:
                    sq = sq * weight.reshape(-1, *([1] * (g.ndim - 1)))
                sq = sq.sum(0)
                sums[i] = sq if sums[i] is None else sums[i] + sq
        return sums, y

    c = columns.c
    batched = vmap(per_datum, in_dims=(dims, 0, None if c is None else 0), randomness="error")
    rows_out = output.reshape(N, T, *columns.rest)
    # no autograd graph through parameters held fixed (torch.func's vjp still differentiates)
    with torch.no_grad(), differentiable_attention():
        for start in range(0, N, n_chunk):
            rows = slice(start, min(start + n_chunk, N))
            x = _slice_data(X, dims, rows)
            sums, y = batched(x, columns.S[rows], None if c is None else c[rows])
            _check_rows(y, rows_out[rows], T)
            for i, sq in zip(indices, sums):
                out[i].add_(sq.sum(0), alpha=alpha)


def _has_data_axis(dims: Any) -> bool:
    if isinstance(dims, dict):
        return any(_has_data_axis(d) for d in dims.values())
    if isinstance(dims, (list, tuple)):
        return any(_has_data_axis(d) for d in dims)
    return dims == 0


def _check_rows(y: Tensor, expected: Tensor, T: int) -> None:
    """The per-datum outputs ``y`` ``[n, ...]`` must be the batch output's rows of the data."""
    n = expected.shape[0]
    if y.numel() != expected.numel():
        raise ValueError(
            f"The model output for one datum has shape {tuple(y.shape[1:])}, but the batch "
            f"output gives each datum {T} row(s) of shape {tuple(expected.shape[2:])}; "
            "diagonal() needs the output rows of a batch to be those of its data, in order."
        )
    if not allclose(y.reshape(expected.shape), expected, floor=1.0):
        raise ValueError(
            f"diagonal() evaluates the model on one datum at a time, but for {n} data the "
            "outputs differ from the rows of the batch output: the output of a datum depends "
            "on other data (e.g. BatchNorm in training mode; call model.eval()), or the rows "
            "are not ordered by datum. Use hutchinson_diag or xdiag on the operator instead."
        )
