"""Random test vectors for the randomized estimators (private).

NOTE [estimator randomness]: every estimator takes ``generator: torch.Generator | None``.
Test vectors are drawn on the generator's device and then moved to the operator's device, so
a CPU generator gives the same numbers on any device. Only when ``generator`` is ``None`` is
PyTorch's global generator (of the operator's device) used; the estimators never touch it
otherwise.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


class Distribution(str, Enum):
    """Distribution of the random test vectors.

    All have zero mean and identity covariance, so :math:`\\mathbb{E}[v v^\\top] = I`.
    """

    RADEMACHER = "rademacher"
    """Independent signs :math:`\\pm 1` with probability 1/2 (the minimum-variance choice
    for Hutchinson's trace estimator, Hutchinson (1989))."""
    NORMAL = "normal"
    """Independent standard normal entries (Girard (1989))."""
    SPHERE = "sphere"
    """Uniform on the sphere of radius :math:`\\sqrt{D}` (normalized Gaussian vectors), so
    :math:`\\mathbb{E}[v v^\\top] = I` still holds. Their direction is uniform, which lets
    XTrace rescale its deflated test vectors (Epperly, Tropp, Webber (2024). XTrace: Making
    the most of every sample in stochastic trace estimation. SIAM J. Matrix Anal. Appl.)."""


def random_test_matrix(
    num_rows: int,
    num_columns: int,
    distribution: Distribution,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Draw a ``[num_rows, num_columns]`` matrix of i.i.d. test-vector entries.

    Args:
        num_rows: Dimension of the test vectors.
        num_columns: Number of test vectors.
        distribution: Entry distribution.
        generator: Random number generator (NOTE [estimator randomness]).
        dtype: Data type of the result.
        device: Device of the result.

    Returns:
        The test vectors as columns.
    """
    draw_device = generator.device if generator is not None else device
    shape = (num_rows, num_columns)
    if distribution == Distribution.RADEMACHER:
        signs = torch.randint(0, 2, shape, generator=generator, device=draw_device)
        return (2 * signs - 1).to(dtype=dtype, device=device)
    V = torch.randn(shape, generator=generator, dtype=dtype, device=draw_device)
    if distribution == Distribution.SPHERE:
        V = V * (num_rows**0.5 / torch.linalg.vector_norm(V, dim=0))
    return V.to(device)
