"""Randomized Nyström approximation of a positive semi-definite operator."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.sketches._common import check_sketch_arguments
from curvops.linear_operator import LinearOperator
from curvops.structured import EigendecompositionLinearOperator


def nystrom_approximation(
    A: LinearOperator | Tensor,
    rank: int,
    *,
    oversampling: int = 10,
    generator: torch.Generator | None = None,
) -> EigendecompositionLinearOperator:
    """Fixed-rank randomized Nyström approximation :math:`\\hat A = U \\Lambda U^\\top`.

    For PSD :math:`A` and an orthonormal Gaussian test matrix
    :math:`\\Omega \\in \\mathbb{R}^{D \\times \\ell}`, :math:`\\ell = k + p`, the Nyström
    approximation is :math:`A \\Omega (\\Omega^\\top A \\Omega)^{+} (A \\Omega)^\\top`. The
    numerically stable algorithm of Tropp, Yurtsever, Udell, Cevher (2017). Fixed-rank
    approximation of a positive-semidefinite matrix from streaming data. NeurIPS
    (Algorithm 3) shifts the sketch :math:`Y = A\\Omega` by
    :math:`\\nu = \\sqrt{D}\\, \\varepsilon \\|Y\\|_2`:

    .. math::
        Y_\\nu = Y + \\nu \\Omega,\\quad
        \\Omega^\\top Y_\\nu = C C^\\top\\ (\\text{Cholesky}),\\quad
        F = Y_\\nu C^{-\\top} = U \\Sigma V^\\top\\ (\\text{thin SVD}),\\quad
        \\Lambda = \\max(\\Sigma^2 - \\nu I, 0),

    and keeps the :math:`k` largest eigenpairs. It costs one block product with :math:`\\ell`
    columns.

    Args:
        A: Symmetric positive semi-definite operator (or dense matrix).
        rank: Rank :math:`k` of the approximation, ``1 <= k <= D``.
        oversampling: Extra test vectors :math:`p` (the sketch has
            :math:`\\min(k + p, D)` columns).
        generator: Random number generator of the test matrix (NOTE [estimator randomness]
            in :mod:`curvops.linalg._sampling`).

    Returns:
        :math:`\\hat A` as an :class:`~curvops.structured.EigendecompositionLinearOperator`
        with ``A``'s tensor shapes, eigenvalues in ascending order.

    Raises:
        ValueError: If ``A`` is not square, symmetric and positive semi-definite, or an
            option is invalid.
    """
    A, rank, sketch_size = check_sketch_arguments(A, rank, oversampling, "nystrom_approximation")
    D = A.shape[0]
    G = random_test_matrix(D, sketch_size, Distribution.NORMAL, generator, A.dtype, A.device)
    Omega, _ = torch.linalg.qr(G)
    Y = A @ Omega
    nu = D**0.5 * torch.finfo(A.dtype).eps * torch.linalg.matrix_norm(Y, ord=2)
    if not bool(nu > 0):  # A Omega = 0: the approximation is zero
        zeros = Y.new_zeros(rank)
        return EigendecompositionLinearOperator(Omega[:, :rank], zeros, A.in_shapes)
    Y_nu = Y + nu * Omega
    B = Omega.T @ Y_nu
    C, info = torch.linalg.cholesky_ex(0.5 * (B + B.T))
    if int(info) != 0:
        raise ValueError(
            "nystrom_approximation needs a positive semi-definite operator, but the sketched "
            "matrix Omega^T A Omega is indefinite. Use randomized_eigh for indefinite "
            "operators."
        )
    F = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T  # Y_nu C^{-T}
    U, sigma, _ = torch.linalg.svd(F, full_matrices=False)
    eigenvalues = torch.clamp(sigma**2 - nu, min=0.0)[:rank]
    return EigendecompositionLinearOperator(
        U[:, :rank].flip(1), eigenvalues.flip(0), A.in_shapes, check_orthonormal=False
    )
