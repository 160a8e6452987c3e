"""The Lanczos process with full reorthogonalization, batched over independent starts.

NOTE [Lanczos basis]: the Lanczos process (Lanczos (1950). An iteration method for the
solution of the eigenvalue problem of linear differential and integral operators) builds an
orthonormal basis :math:`V_m = [v_1, \\dots, v_m]` of the Krylov space
:math:`\\mathcal{K}_m(A, v_1)` of a symmetric :math:`A` and the projection
:math:`H_m = V_m^\\top A V_m` such that

.. math::
    A V_m = V_m H_m + \\beta_m v_{m+1} e_m^\\top,\\qquad v_{m+1} \\perp V_m.

Here every new vector is orthogonalized against *all* previous ones, twice (classical
Gram-Schmidt with one reorthogonalization; "twice is enough", Giraud, Langou, Rozloznik
(2005). The loss of orthogonality in the Gram-Schmidt orthogonalization process), and the
column :math:`j` of :math:`H_m` is the vector of projection coefficients of
:math:`A v_j`. For a plain Lanczos run :math:`H_m` is tridiagonal; after a thick restart
(:func:`curvops.linalg.eigsh`) it is diagonal plus an arrowhead. Filling :math:`H_m` from the
projections covers both cases. If :math:`\\beta_j` vanishes (the Krylov space is invariant),
the process continues with a random unit vector orthogonal to the basis and couples it with
:math:`\\beta_j = 0`, which keeps the relation above exact; :math:`H_m` then decouples into
blocks. Several independent processes (one per column of the start block) run at once, and
each step multiplies :math:`A` onto all of them with one block product.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from curvops.linear_operator import LinearOperator


def _project_out(W: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the components of ``W`` along ``V`` twice (classical Gram-Schmidt, twice).

    Args:
        W: Vectors ``[R, D]``.
        V: Orthonormal bases ``[R, j, D]``.

    Returns:
        The orthogonalized vectors ``[R, D]`` and the projection coefficients ``[R, j]``.
    """
    coeffs = torch.zeros(V.shape[0], V.shape[1], dtype=W.dtype, device=W.device)
    for _ in range(2):
        c = torch.einsum("rjd,rd->rj", V, W)
        W = W - torch.einsum("rjd,rj->rd", V, c)
        coeffs = coeffs + c
    return W, coeffs


def random_orthogonal_unit_vectors(
    V: Tensor, rows: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw random unit vectors orthogonal to the bases ``V[rows]``.

    Args:
        V: Orthonormal bases ``[R, j, D]``.
        rows: Indices of the processes that need a new vector.
        generator: Random number generator (``None``: the global one).

    Returns:
        The unit vectors ``[len(rows), D]`` and a flag per row whether one exists (``False``
        if the basis already spans the whole space).
    """
    D = V.shape[-1]
    device = generator.device if generator is not None else V.device
    W = torch.randn(rows.numel(), D, generator=generator, dtype=V.dtype, device=device)
    W, _ = _project_out(W.to(V.device), V[rows])
    exists = torch.full((rows.numel(),), V.shape[1] < D, dtype=torch.bool, device=V.device)
    norms = torch.linalg.vector_norm(W, dim=1, keepdim=True)
    W = torch.where(exists.unsqueeze(1), W / norms.clamp(min=torch.finfo(V.dtype).tiny), 0.0)
    return W, exists


def lanczos_steps(
    A: LinearOperator,
    V: Tensor,
    H: Tensor,
    start: int,
    stop: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Run Lanczos steps ``start, ..., stop - 1`` in place (NOTE [Lanczos basis]).

    On entry, ``V[:, :start + 1]`` holds orthonormal vectors and ``H[:, :start, :start]`` their
    projection. On exit, ``V[:, :stop + 1]`` and ``H[:, :stop, :stop]`` are filled.

    Args:
        A: Symmetric operator of dimension ``D``.
        V: Bases ``[R, m + 1, D]`` of ``R`` independent processes (``stop <= m``).
        H: Projections ``[R, m, m]``.
        start: First step to run (number of basis vectors already expanded).
        stop: Number of expanded vectors on exit.
        generator: Random number generator for the vectors that replace a vanished
            :math:`\\beta` (``None``: the global one; only used on breakdown).

    Returns:
        The couplings :math:`\\beta` of the last step, ``[R]`` (zero where the basis spans
        the whole space).
    """
    eps = torch.finfo(V.dtype).eps
    beta = torch.zeros(V.shape[0], dtype=V.dtype, device=V.device)
    for j in range(start, stop):
        W = (A @ V[:, j].T).T  # one block product for all processes
        size = torch.linalg.vector_norm(W, dim=1)
        W, coeffs = _project_out(W, V[:, : j + 1])
        H[:, : j + 1, j] = coeffs
        H[:, j, : j + 1] = coeffs
        beta = torch.linalg.vector_norm(W, dim=1)
        broken = beta <= 10 * eps * size
        W = W / torch.where(broken, torch.ones_like(beta), beta).unsqueeze(1)
        if bool(broken.any()):
            rows = broken.nonzero().squeeze(1)
            W[rows], _ = random_orthogonal_unit_vectors(V[:, : j + 1], rows, generator)
            beta = torch.where(broken, torch.zeros_like(beta), beta)
        V[:, j + 1] = W
    return beta


def lanczos_tridiagonalization(
    A: LinearOperator,
    V0: Tensor,
    num_steps: int,
    generator: torch.Generator | None,
    progressbar: bool = False,
) -> Tensor:
    """Run ``num_steps`` Lanczos steps from each column of ``V0`` and return the projections.

    Args:
        A: Symmetric operator of dimension ``D``.
        V0: Start vectors ``[D, R]`` (normalized internally).
        num_steps: Number of steps :math:`m \\leq D`.
        generator: Random number generator used on breakdown only.
        progressbar: Whether to show a progress bar over the steps.

    Returns:
        The tridiagonal projections :math:`H_m = V_m^\\top A V_m`, ``[R, m, m]``.
    """
    D, R = V0.shape
    V = torch.zeros(R, num_steps + 1, D, dtype=V0.dtype, device=V0.device)
    V[:, 0] = (V0 / torch.linalg.vector_norm(V0, dim=0)).T
    H = torch.zeros(R, num_steps, num_steps, dtype=V0.dtype, device=V0.device)
    for j in tqdm(range(num_steps), disable=not progressbar, desc="Lanczos"):
        lanczos_steps(A, V, H, j, j + 1, generator)
    return H
