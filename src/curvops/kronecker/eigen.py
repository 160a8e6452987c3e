"""Eigendecompositions of Kronecker factors, with a float64 retry and errors naming the layer."""

from __future__ import annotations

import torch
from torch import Tensor


def factor_eigh(
    matrix: Tensor, *, what: str, retry_double_precision: bool = True
) -> tuple[Tensor, Tensor]:
    r"""Eigendecompose a symmetric positive semi-definite factor.

    NOTE [numerical rank of factors]: a symmetric eigensolver resolves eigenvalues only up to
    an absolute error of about :math:`n \varepsilon \lambda_\max` (:math:`\varepsilon` the
    unit round-off of the dtype), so eigenvalues of a PSD factor below this tolerance,
    including slightly negative ones from round-off, are set to 0. A rank-deficient factor
    (e.g. a gradient factor from fewer rows than its dimension) then has exact zero
    eigenvalues whatever order the sums were accumulated in, and is reported as singular
    instead of being inverted with eigenvalues of pure round-off (the tolerance of
    ``numpy.linalg.matrix_rank``).

    Args:
        matrix: Symmetric ``[n, n]`` matrix.
        what: Description of the factor (layer and factor name) for error messages.
        retry_double_precision: Whether to retry in float64 if the decomposition fails or
            is not finite in a lower precision.

    Returns:
        Eigenvalues ``[n]`` (ascending, non-negative, zero below the tolerance of NOTE
        [numerical rank of factors]) and orthonormal eigenvectors ``[n, n]``
        (columns), in the matrix's dtype.

    Raises:
        FloatingPointError: If the matrix contains NaN or Inf.
        RuntimeError: If the decomposition fails (also after the retry).
    """
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(
            f"The {what} contains NaN or Inf entries, so it cannot be decomposed. Check the "
            f"model and data for non-finite values, or compute the factors in float64."
        )
    try:
        lam, Q = torch.linalg.eigh(matrix)
        ok = bool(torch.isfinite(lam).all() and torch.isfinite(Q).all())
        error = None
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        ok, error = False, e
    if not ok:
        if not retry_double_precision or matrix.dtype == torch.float64:
            raise RuntimeError(
                f"The eigendecomposition of the {what} ({matrix.dtype}) failed"
                + (f": {error}" if error is not None else " (non-finite result)")
                + ". Pass retry_double_precision=True, compute the factors in float64, or "
                "add damping."
            ) from error
        lam64, Q64 = factor_eigh(matrix.to(torch.float64), what=what, retry_double_precision=False)
        lam, Q = lam64.to(matrix.dtype), Q64.to(matrix.dtype)
    # NOTE [numerical rank of factors]
    tol = matrix.shape[-1] * torch.finfo(lam.dtype).eps * lam.abs().max().clamp(min=0)
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    # eigh returns column-major eigenvectors; torch.kron (used by dense exports) rejects them
    return lam, Q.contiguous()
