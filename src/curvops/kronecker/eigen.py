"""Eigendecompositions of Kronecker factors, with a float64 retry and errors naming the layer."""

from __future__ import annotations

import torch
from torch import Tensor


def factor_eigh(
    matrix: Tensor, *, what: str, retry_double_precision: bool = True
) -> tuple[Tensor, Tensor]:
    """Eigendecompose a symmetric positive semi-definite factor.

    Round-off can make eigenvalues of a PSD factor slightly negative; they are clipped at 0.

    Args:
        matrix: Symmetric ``[n, n]`` matrix.
        what: Description of the factor (layer and factor name) for error messages.
        retry_double_precision: Whether to retry in float64 if the decomposition fails or
            is not finite in a lower precision.

    Returns:
        Eigenvalues ``[n]`` (ascending, non-negative) and orthonormal eigenvectors ``[n, n]``
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
    # eigh returns column-major eigenvectors; torch.kron (used by dense exports) rejects them
    return lam.clamp(min=0), Q.contiguous()
