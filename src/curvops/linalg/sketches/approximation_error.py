"""A-posteriori error estimates of an approximation from a few random products."""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from curvops.linalg._inputs import as_linear_operator, parse_enum
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.estimators._checks import check_num_matvecs
from curvops.linear_operator import LinearOperator


class ErrorNorm(str, Enum):
    """Norm of :func:`estimate_approximation_error`."""

    FROBENIUS = "frobenius"
    """Unbiased estimate of :math:`\\|A - \\hat A\\|_F^2`, returned as its square root."""
    SPECTRAL = "spectral"
    """Probabilistic upper bound on :math:`\\|A - \\hat A\\|_2`."""


def estimate_approximation_error(
    A: LinearOperator | Tensor,
    approximation: LinearOperator | Tensor,
    *,
    num_matvecs: int = 10,
    norm: str = "frobenius",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate the error :math:`\\|A - \\hat A\\|` of an approximation by random products.

    With Gaussian test vectors :math:`\\omega_i` and :math:`E = A - \\hat A`:

    * ``"frobenius"``: :math:`\\|E\\|_F^2 = \\mathbb{E}\\|E\\omega\\|^2`, so
      :math:`\\big(\\frac{1}{r}\\sum_i \\|E \\omega_i\\|^2\\big)^{1/2}` estimates
      :math:`\\|E\\|_F` (its square is unbiased).
    * ``"spectral"``: the bound of Halko, Martinsson, Tropp (2011). Finding structure with
      randomness. SIAM Review (§4.3, Lemma 4.1),

      .. math::
          \\|E\\|_2 \\leq 10 \\sqrt{2/\\pi}\\, \\max_{i=1..r} \\|E \\omega_i\\|

      holds with probability at least :math:`1 - 10^{-r}`.

    Costs one block product with ``A`` and one with the approximation (both with
    :math:`r` columns), in the flat format, so ``A`` may have tensor-list shapes that the
    approximation does not share.

    Args:
        A: The operator (or dense matrix).
        approximation: Its approximation :math:`\\hat A`, of the same (flat) shape, e.g. from
            :func:`~curvops.linalg.nystrom_approximation`.
        num_matvecs: Number of test vectors :math:`r`.
        norm: ``"frobenius"`` or ``"spectral"``.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).

    Returns:
        The error estimate (a 0-d tensor).

    Raises:
        ValueError: If the shapes, dtypes or devices differ, or an option is invalid.
    """
    A = as_linear_operator(A)
    approximation = as_linear_operator(approximation, "approximation")
    if A.shape != approximation.shape:
        raise ValueError(
            f"A has shape {A.shape}, but the approximation has shape {approximation.shape}."
        )
    if A.dtype != approximation.dtype or A.device != approximation.device:
        raise ValueError(
            f"A has dtype/device {A.dtype}/{A.device}, but the approximation has "
            f"{approximation.dtype}/{approximation.device}."
        )
    norm = parse_enum(norm, ErrorNorm, "norm")
    num_matvecs = check_num_matvecs(num_matvecs, "estimate_approximation_error")
    Omega = random_test_matrix(
        A.shape[1], num_matvecs, Distribution.NORMAL, generator, A.dtype, A.device
    )
    residual_norms = torch.linalg.vector_norm(A @ Omega - approximation @ Omega, dim=0)
    if norm == ErrorNorm.FROBENIUS:
        return residual_norms.square().mean().sqrt()
    return 10 * math.sqrt(2 / math.pi) * residual_norms.max()
