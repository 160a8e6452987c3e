"""The (block) Lanczos process with full reorthogonalization, batched over independent starts.

NOTE [Lanczos basis]: the Lanczos process (Lanczos (1950). An iteration method for the
solution of the eigenvalue problem of linear differential and integral operators) builds an
orthonormal basis :math:`V_m = [v_1, \\dots, v_m]` of the Krylov space
:math:`\\mathcal{K}_m(A, v_1)` of a symmetric :math:`A` and the projection
:math:`H_m = V_m^\\top A V_m` such that

.. math::
    A V_m = V_m H_m + \\beta_m v_{m+1} e_m^\\top,\\qquad v_{m+1} \\perp V_m.

The block version (Golub & Underwood (1977). The block Lanczos method for computing
eigenvalues. Mathematical Software III) starts from :math:`b` orthonormal vectors
:math:`V_b` and spans the block Krylov space
:math:`\\operatorname{span}\\{V_b, A V_b, A^2 V_b, \\dots\\}`. Here it is run column by column
in the band form of Ruhe (1979). Implementation aspects of band Lanczos algorithms for
computation of eigenvalues of large sparse symmetric matrices. Math. Comp.: step :math:`j`
orthogonalizes :math:`A v_j` against :math:`v_1, \\dots, v_{j+b-1}` and appends the remainder,
normalized, as :math:`v_{j+b}`, so that

.. math::
    A V_m = V_m H_m + V_{m+1:m+b} C_m,\\qquad V_{m+1:m+b} \\perp V_m,

with the coupling :math:`C_m = V_{m+1:m+b}^\\top A V_m` (:math:`b \\times m`); for
:math:`b = 1` this is the relation above. The products of :math:`b` consecutive columns are
independent of each other, so they are computed with one block product of :math:`b` columns
(much cheaper than :math:`b` single products for curvature operators), and only the cheap
orthogonalizations run one column at a time. In exact arithmetic a block of :math:`b`
generic start vectors sees :math:`\\min(b, \\mu)` copies of an eigenvalue of multiplicity
:math:`\\mu`, while one start vector sees only one (Saad (2011). Numerical Methods for Large
Eigenvalue Problems, 2nd ed., Sec. 6.9).

Every new vector is orthogonalized against *all* previous ones, twice (classical
Gram-Schmidt with one reorthogonalization; "twice is enough", Giraud, Langou, Rozloznik
(2005). The loss of orthogonality in the Gram-Schmidt orthogonalization process), and the
column :math:`j` of :math:`H` (rows :math:`1, \\dots, j + b`) is the vector of projection
coefficients of :math:`A v_j`. For a plain Lanczos run :math:`H_m` is banded (tridiagonal for
:math:`b = 1`); after a thick restart (:func:`curvops.linalg.eigsh`) it is diagonal plus
bordering rows and columns. Filling :math:`H` from the projections covers both cases. If
:math:`A v_j` lies (numerically) in the span of the basis (the Krylov space is invariant, or a
block vector is linearly dependent on the others), the process continues with a random unit
vector orthogonal to the basis and couples it with zero, which keeps the relation above
exact. Several independent processes (one per start) run at once, and each block step
multiplies :math:`A` onto all of them with one block product.
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
    W = W.unsqueeze(2)
    coeffs = V @ W  # [R, j, 1]
    W = W - V.mT @ coeffs
    c = V @ W
    W = W - V.mT @ c
    return W.squeeze(2), (coeffs + c).squeeze(2)


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


def _block_product(A: LinearOperator, X: Tensor) -> Tensor:
    """Multiply ``A`` onto the vectors ``X`` ``[R, n, D]`` with one block product.

    Raises:
        FloatingPointError: If the product contains NaN or Inf.
    """
    R, n, D = X.shape
    W = (A @ X.reshape(R * n, D).T).T.reshape(R, n, D)
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(
            f"Lanczos: the product of the {type(A).__name__} with its basis vectors contains "
            f"NaN or Inf entries, so the operator is not finite. Check the matrix (or the model "
            f"and data) for non-finite values, or use float64."
        )
    return W


def lanczos_steps(
    A: LinearOperator,
    V: Tensor,
    H: Tensor,
    start: int,
    stop: int,
    generator: torch.Generator | None,
    block_size: int = 1,
) -> Tensor:
    """Run (block) Lanczos steps ``start, ..., stop - 1`` in place (NOTE [Lanczos basis]).

    With block size :math:`b`, step :math:`j` multiplies :math:`v_j` and appends
    :math:`v_{j+b}`; up to :math:`b` consecutive steps share one block product. On entry,
    ``V[:, :start + b]`` holds orthonormal vectors and ``H[:, :start + b, :start]`` the
    projections of the products of the first ``start`` of them. On exit, ``V[:, :stop + b]``
    and ``H[:, :stop + b, :stop]`` (and the symmetric entries) are filled.

    Args:
        A: Symmetric operator of dimension ``D``.
        V: Bases ``[R, n, D]`` of ``R`` independent processes (``stop + b <= n``).
        H: Projections ``[R, n', n']`` with ``stop + b <= n'``.
        start: First step to run (number of basis vectors already multiplied).
        stop: Number of multiplied vectors on exit.
        generator: Random number generator for the vectors that replace a vanished
            coupling (``None``: the global one; only used on breakdown).
        block_size: Block size :math:`b` (``1``: plain Lanczos).

    Returns:
        A flag ``[R]`` per process whether a coupling vanished in one of the steps (a
        breakdown: the basis vector that follows it is random).

    Raises:
        FloatingPointError: If a product contains NaN or Inf.
    """
    eps = torch.finfo(V.dtype).eps
    b = block_size
    breakdown = torch.zeros(V.shape[0], dtype=torch.bool, device=V.device)
    for chunk_start in range(start, stop, b):
        chunk_stop = min(chunk_start + b, stop)
        products = _block_product(A, V[:, chunk_start:chunk_stop])  # one product per chunk
        for j in range(chunk_start, chunk_stop):
            W = products[:, j - chunk_start]
            size = torch.linalg.vector_norm(W, dim=1)
            W, coeffs = _project_out(W, V[:, : j + b])
            beta = torch.linalg.vector_norm(W, dim=1)
            broken = beta <= 10 * eps * size
            if bool(broken.any()):
                W = W / torch.where(broken, torch.ones_like(beta), beta).unsqueeze(1)
                rows = broken.nonzero().squeeze(1)
                W[rows], _ = random_orthogonal_unit_vectors(V[:, : j + b], rows, generator)
                beta = torch.where(broken, torch.zeros_like(beta), beta)
                breakdown = breakdown | broken
            else:
                W = W / beta.unsqueeze(1)
            column = torch.cat([coeffs, beta.unsqueeze(1)], dim=1)
            H[:, : j + b + 1, j] = column
            H[:, j, : j + b + 1] = column
            V[:, j + b] = W
    return breakdown


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

    Raises:
        FloatingPointError: If a product contains NaN or Inf.
    """
    D, R = V0.shape
    V = torch.zeros(R, num_steps + 1, D, dtype=V0.dtype, device=V0.device)
    V[:, 0] = (V0 / torch.linalg.vector_norm(V0, dim=0)).T
    H = torch.zeros(R, num_steps + 1, num_steps + 1, dtype=V0.dtype, device=V0.device)
    for j in tqdm(range(num_steps), disable=not progressbar, desc="Lanczos"):
        lanczos_steps(A, V, H, j, j + 1, generator)
    return H[:, :num_steps, :num_steps]
