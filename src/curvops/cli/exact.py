"""Exact quantities of an operator where it offers them: dense matrix, trace, diagonal.

The command line prefers what an operator computes exactly and cheaply from its structure
(KFAC's trace :math:`\\sum_l \\operatorname{tr}(B_l) \\operatorname{tr}(A_l)`, the diagonal
of a block-diagonal or Kronecker operator, an operator's own ``to_dense()``) over generic
matrix-free work (randomized estimators, products with columns of the identity). An
operator "offers" ``trace()`` or ``diagonal()`` if it has the method and the method does not
raise :class:`NotImplementedError` (the convention for operators that have no exact form).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator


def has_own_to_dense(A: LinearOperator) -> bool:
    """Whether the operator's class materialises itself in its own way.

    Structured operators (diagonal, Kronecker, block-diagonal, ...) override
    :meth:`~curvops.LinearOperator.to_dense` with a closed form; the base class multiplies
    onto the identity.

    Args:
        A: The operator.

    Returns:
        ``True`` if ``type(A).to_dense`` is not the base class's.
    """
    return type(A).to_dense is not LinearOperator.to_dense


def dense_steps(A: LinearOperator, columns: int) -> int:
    """Number of steps :func:`dense_matrix` takes (for progress bars).

    Args:
        A: The operator.
        columns: Columns of the identity per product.

    Returns:
        1 if the operator materialises itself or ``columns`` covers it, else the number of
        column blocks.
    """
    D = A.shape[1]
    if has_own_to_dense(A) or columns >= D:
        return 1
    return -(-D // columns)


def dense_matrix(
    A: LinearOperator, columns: int, on_step: Callable[[int, int], None] | None = None
) -> Tensor:
    """The dense ``[D_out, D_in]`` matrix of an operator.

    Uses the operator's own ``to_dense()`` where its class has one (see
    :func:`has_own_to_dense`) or where ``columns`` covers all of it; otherwise multiplies
    onto blocks of ``columns`` columns of the identity (many-column products, each one
    pass over the data), so that progress can be shown between blocks.

    Args:
        A: The operator.
        columns: Columns of the identity per product (at least 1).
        on_step: Called as ``on_step(done, total)`` after each block.

    Returns:
        The dense matrix.

    Raises:
        ValueError: If ``columns`` is not positive.
    """
    if columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns}.")
    total = dense_steps(A, columns)
    if total == 1:
        M = A.to_dense()
        if on_step is not None:
            on_step(1, 1)
        return M
    D = A.shape[1]
    blocks = []
    for i, start in enumerate(range(0, D, columns)):
        eye = torch.zeros(D, min(columns, D - start), dtype=A.dtype, device=A.device)
        eye[start : start + eye.shape[1]].fill_diagonal_(1.0)
        blocks.append(A @ eye)
        if on_step is not None:
            on_step(i + 1, total)
    return torch.cat(blocks, dim=1)


def _offered(A: LinearOperator, name: str) -> Tensor | list[Tensor] | None:
    method = getattr(A, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except NotImplementedError:
        return None


def exact_trace(A: LinearOperator) -> Tensor | None:
    """The operator's exact trace if it offers one, else ``None``.

    Args:
        A: The operator.

    Returns:
        The trace (a 0-d tensor) or ``None``.
    """
    trace = _offered(A, "trace")
    return None if trace is None else torch.as_tensor(trace).reshape(())


def exact_diagonal(A: LinearOperator) -> Tensor | None:
    """The operator's exact diagonal, flat ``[D]``, if it offers one, else ``None``.

    Args:
        A: The operator.

    Returns:
        The diagonal (tensor-list results are flattened in parameter order) or ``None``.
    """
    diagonal = _offered(A, "diagonal")
    if isinstance(diagonal, (list, tuple)):
        diagonal = torch.cat([d.reshape(-1) for d in diagonal])
    return diagonal
