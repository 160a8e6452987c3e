"""Shared machinery of the iterative inverse operators (private).

NOTE [iterative inverses]: an iterative inverse :math:`A^{-1}` multiplies onto a block of
:math:`K` right-hand sides :math:`B \\in \\mathbb{R}^{D \\times K}` by solving :math:`A X = B`
for all columns at once. Products with :math:`A` are flat block products ``A @ P`` with
``P`` of shape ``[D, K_active]``: columns that have converged are frozen and dropped from
later products. The solve runs on the operator's device and dtype, and the result comes back
in the format the caller used (flat vector, flat matrix or tensor list), because the
operators implement :meth:`~curvops.LinearOperator._matmat` only. After each product,
``last_info`` holds the convergence information of that solve.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvops.linalg._inputs import as_linear_operator, check_positive_float, check_positive_int
from curvops.linear_operator import LinearOperator


class _IterativeInverseLinearOperator(LinearOperator):
    """Base class: an inverse that solves linear systems with block products of ``A``.

    The inverse maps ``A``'s output space to its input space, so its ``in_shapes`` are
    ``A.out_shapes`` and vice versa. Subclasses implement :meth:`_solve`.
    """

    def __init__(self, A: LinearOperator):
        """Store the operator to invert.

        Args:
            A: The operator (already validated by the subclass).
        """
        super().__init__(A.out_shapes, A.in_shapes, dtype=A.dtype, device=A.device)
        self._A = A
        self.last_info = None

    @property
    def operator(self) -> LinearOperator:
        """The operator :math:`A` that is inverted."""
        return self._A

    def _solve(self, B: Tensor, adjoint: bool) -> Tensor:
        """Solve :math:`A X = B` (or :math:`A^\\top X = B`) for a flat block ``B`` ``[D, K]``.

        Args:
            B: Right-hand sides, one per column.
            adjoint: Whether to solve with :math:`A^\\top` instead of :math:`A`.

        Returns:
            The solutions ``X`` ``[D, K]``.
        """
        raise NotImplementedError

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        solution = self._solve(self._list_to_flat(X), adjoint=False)
        return self._flat_to_list(solution, self._out_shapes)

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        solution = self._solve(self._list_to_flat(X), adjoint=True)
        return self._flat_to_list(solution, self._in_shapes)


def check_preconditioner(preconditioner: object, A: LinearOperator) -> LinearOperator | None:
    """Validate an optional preconditioner :math:`P \\approx A^{-1}`.

    Args:
        preconditioner: ``None``, a linear operator or a dense matrix.
        A: The operator to be inverted.

    Returns:
        The preconditioner as a linear operator, or ``None``.

    Raises:
        ValueError: If its shape, dtype or device does not match ``A``.
    """
    if preconditioner is None:
        return None
    P = as_linear_operator(preconditioner, "preconditioner")
    if P.shape != (A.shape[1], A.shape[0]):
        raise ValueError(
            f"The preconditioner has shape {P.shape}, but approximating the inverse of an "
            f"operator of shape {A.shape} requires shape {(A.shape[1], A.shape[0])}."
        )
    if P.dtype != A.dtype or P.device != A.device:
        raise ValueError(
            f"The preconditioner has dtype/device {P.dtype}/{P.device}, but the operator has "
            f"{A.dtype}/{A.device}. Convert the preconditioner to match."
        )
    return P


def check_tolerance_and_max_iter(
    tolerance: object, max_iter: object, default_max_iter: int
) -> tuple[float, int]:
    """Validate a relative tolerance and an optional iteration cap.

    Args:
        tolerance: Relative tolerance, a number ``> 0``.
        max_iter: Maximum number of iterations, or ``None`` for ``default_max_iter``.
        default_max_iter: The cap used when ``max_iter`` is ``None``.

    Returns:
        The tolerance as a float and the iteration cap as an int.
    """
    tolerance = check_positive_float(tolerance, "tolerance")
    max_iter = default_max_iter if max_iter is None else check_positive_int(max_iter, "max_iter")
    return tolerance, max_iter


def warn_not_converged(name: str, num_left: int, num_total: int, max_iter: int, worst: float):
    """Warn that some columns did not reach the tolerance within ``max_iter`` iterations.

    Args:
        name: Name of the solver.
        num_left: Number of columns that did not converge.
        num_total: Number of columns in the block.
        max_iter: The iteration cap.
        worst: Largest remaining relative residual.
    """
    warnings.warn(
        f"{name} did not converge for {num_left} of {num_total} right-hand sides within "
        f"max_iter={max_iter} iterations (largest relative residual {worst:.3g}). Increase "
        f"max_iter, loosen the tolerance, add damping or pass a preconditioner. See "
        f"`last_info` for details.",
        RuntimeWarning,
        stacklevel=4,
    )


def column_norms(X: Tensor) -> Tensor:
    """Euclidean norm of each column of a ``[D, K]`` block (``[K]``)."""
    return torch.linalg.vector_norm(X, dim=0)
