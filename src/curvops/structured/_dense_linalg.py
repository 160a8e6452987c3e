"""Dense-matrix building blocks of the structured operators (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.structured._checks import logdet_from_sign


def is_symmetric(M: Tensor) -> bool:
    """Whether a matrix is square and numerically symmetric (``torch.allclose(M, M.T)``).

    Args:
        M: Matrix ``[m, n]``.

    Returns:
        ``True`` if ``m == n`` and :math:`M \\approx M^\\top`.
    """
    return M.shape[0] == M.shape[1] and bool(torch.allclose(M, M.T))


def invert_dense(M: Tensor, damping: float, *, symmetric: bool, name: str) -> Tensor:
    """Invert :math:`M + \\delta I` once (factorize once, apply many).

    For symmetric matrices the Cholesky factorization :math:`M + \\delta I = L L^\\top` is
    tried first (half the cost of LU, and the result is symmetric); if it fails (indefinite
    matrix) or the matrix is not symmetric, an LU-based inverse is used.

    Args:
        M: Square matrix ``[n, n]``.
        damping: :math:`\\delta \\geq 0`.
        symmetric: Whether :math:`M` is symmetric.
        name: Name of the matrix, for the error message.

    Returns:
        :math:`(M + \\delta I)^{-1}`.

    Raises:
        ValueError: If :math:`M + \\delta I` is singular.
    """
    n = M.shape[0]
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    A = M + damping * eye if damping != 0.0 else M
    if symmetric:
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
    try:
        inv = torch.linalg.solve(A, eye)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"The {name} plus damping {damping} is singular and cannot be inverted. Pass a "
            f"positive `damping` to invert M + damping * I instead."
        ) from err
    return 0.5 * (inv + inv.T) if symmetric else inv


def dense_logdet(M: Tensor, name: str) -> Tensor:
    """:math:`\\log \\det M` of a square matrix via ``torch.linalg.slogdet``.

    See NOTE [log-determinant semantics] in ``curvops.structured._checks``.

    Args:
        M: Square matrix.
        name: Name of the matrix, for the error message.

    Returns:
        :math:`\\log \\det M` (``-inf`` if singular).
    """
    sign, logabsdet = torch.linalg.slogdet(M)
    return logdet_from_sign(sign, logabsdet, name)
