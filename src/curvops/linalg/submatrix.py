"""A submatrix (selected rows and columns) of a linear operator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvops.linalg._inputs import as_linear_operator
from curvops.linear_operator import LinearOperator


def _check_indices(idxs: object, dim: int, what: str, device: torch.device) -> Tensor:
    """Validate indices into a flat dimension ``dim`` and return them as a long tensor.

    Args:
        idxs: A sequence of ints or a 1d integer tensor.
        dim: Size of the dimension the indices select from.
        what: Name of the argument, used in error messages.
        device: Device of the returned tensor.

    Returns:
        The indices as a 1d ``torch.long`` tensor on ``device``.

    Raises:
        TypeError: If the indices are not integers.
        ValueError: If they are empty, not 1d, out of range or contain duplicates.
    """
    if isinstance(idxs, Tensor):
        if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
            raise TypeError(f"{what} must hold integers, got a tensor of dtype {idxs.dtype}.")
        t = idxs.to(device=device, dtype=torch.long)
    else:
        if not isinstance(idxs, Sequence) or isinstance(idxs, str):
            raise TypeError(
                f"{what} must be a sequence of ints or a 1d integer tensor, got "
                f"{type(idxs).__name__}."
            )
        if any(isinstance(i, bool) or not isinstance(i, int) for i in idxs):
            raise TypeError(f"{what} must hold Python ints, got {list(idxs)!r}.")
        t = torch.tensor(list(idxs), dtype=torch.long, device=device)
    if t.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty; select at least one index.")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= dim:
        raise ValueError(
            f"{what} must lie in [0, {dim - 1}] (the operator's flat dimension is {dim}), got "
            f"indices from {low} to {high}."
        )
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{what} contains duplicate indices; pass each index at most once.")
    return t


class SubmatrixLinearOperator(LinearOperator):
    """The submatrix :math:`A[\\text{rows}, \\text{cols}]` of a linear operator.

    The indices refer to the flat dimensions of :math:`A` (NOTE [flattening convention] in
    :mod:`curvops.linear_operator`). A product embeds the input into the column space of
    :math:`A` (zeros outside ``col_idxs``), multiplies with :math:`A` and keeps the rows
    ``row_idxs``:

    .. math::
        A[\\text{rows}, \\text{cols}]\\, x = E_\\text{rows}^\\top A E_\\text{cols} x,

    with :math:`E` the selection matrices (columns of the identity). The adjoint is
    :math:`E_\\text{cols}^\\top A^\\top E_\\text{rows}`. The operator acts on flat vectors
    ``[len(col_idxs)]`` and returns ``[len(row_idxs)]``.

    Examples:
        >>> import torch
        >>> M = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
        >>> S = SubmatrixLinearOperator(M, [0, 2], [1])
        >>> S.to_dense()
        tensor([[1.],
                [7.]], dtype=torch.float64)
    """

    def __init__(
        self,
        A: LinearOperator | Tensor,
        row_idxs: Sequence[int] | Tensor,
        col_idxs: Sequence[int] | Tensor,
    ):
        """Select rows and columns of an operator.

        Args:
            A: The operator (or a dense matrix).
            row_idxs: Distinct flat row indices in ``[0, D_out)``.
            col_idxs: Distinct flat column indices in ``[0, D_in)``.

        Raises:
            TypeError: If the indices are not integers.
            ValueError: If the indices are empty, out of range or contain duplicates.
        """
        A = as_linear_operator(A)
        d_out, d_in = A.shape
        rows = _check_indices(row_idxs, d_out, "row_idxs", A.device)
        cols = _check_indices(col_idxs, d_in, "col_idxs", A.device)
        super().__init__([(cols.numel(),)], [(rows.numel(),)], dtype=A.dtype, device=A.device)
        self._A, self._rows, self._cols = A, rows, cols
        self.is_self_adjoint = A.is_self_adjoint and torch.equal(rows, cols)
        self.is_psd = A.is_psd and self.is_self_adjoint

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        x = X[0]
        embedded = x.new_zeros(self._A.shape[1], x.shape[-1])
        embedded[self._cols] = x
        return [(self._A @ embedded)[self._rows]]

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        x = X[0]
        embedded = x.new_zeros(self._A.shape[0], x.shape[-1])
        embedded[self._rows] = x
        return [(self._A.adjoint() @ embedded)[self._cols]]
