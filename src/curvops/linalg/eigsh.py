"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos, in PyTorch."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor
from tqdm import tqdm

from curvops.linalg._inputs import (
    as_linear_operator,
    check_positive_float,
    check_positive_int,
    parse_enum,
    require_self_adjoint,
    require_square,
)
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.lanczos import lanczos_steps
from curvops.linear_operator import LinearOperator


class Which(str, Enum):
    """Which eigenvalues :func:`eigsh` computes (SciPy's names)."""

    LA = "LA"
    """Largest algebraic."""
    SA = "SA"
    """Smallest algebraic."""
    LM = "LM"
    """Largest magnitude."""


def _preference(theta: Tensor, which: Which) -> Tensor:
    """Indices of the Ritz values ordered from most to least wanted."""
    if which == Which.LA:
        return torch.argsort(theta, descending=True)
    if which == Which.SA:
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _start_vector(
    v0: Tensor | None, D: int, A: LinearOperator, generator: torch.Generator | None
) -> Tensor:
    """Turn the warm start (``None``, ``[D]`` or ``[D, m]``) into one unit start vector."""
    if v0 is None:
        v = random_test_matrix(D, 1, Distribution.NORMAL, generator, A.dtype, A.device)[:, 0]
    else:
        if not isinstance(v0, Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != D:
            got = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
            raise ValueError(
                f"v0 must be a tensor of shape [{D}] (a start vector) or [{D}, m] (a subspace, "
                f"e.g. previous eigenvectors), got {got}."
            )
        v0 = v0.to(dtype=A.dtype, device=A.device)
        if v0.ndim == 2:
            # equal weight on every direction of the subspace: if it is (nearly) invariant,
            # the Krylov space of the sum recovers it in m steps
            Q, _ = torch.linalg.qr(v0)
            v0 = Q.sum(dim=1)
        v = v0
    norm = torch.linalg.vector_norm(v)
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise ValueError("v0 must be non-zero and finite.")
    return v / norm


def eigsh(
    A: LinearOperator | Tensor,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    progressbar: bool = False,
) -> tuple[Tensor, Tensor]:
    """Compute ``k`` extreme eigenpairs of a symmetric operator (like ``scipy``'s ``eigsh``).

    Thick-restart Lanczos (Wu & Simon (2000). Thick-restart Lanczos method for large
    symmetric eigenvalue problems. SIAM J. Matrix Anal. Appl.) with full reorthogonalization
    (NOTE [Lanczos basis] in :mod:`curvops.linalg.lanczos`), in PyTorch on the operator's
    device. Each cycle expands the basis to ``ncv`` vectors, one product each, and computes
    the Ritz pairs :math:`(\\theta_i, y_i)` of :math:`H = V^\\top A V`. Their residual norms
    follow without products from :math:`\\|A y_i - \\theta_i y_i\\| = \\beta_m |s_{mi}|`,
    with :math:`s_i` the eigenvector of :math:`H`. A Ritz pair is accepted once
    :math:`\\beta_m |s_{mi}| \\leq \\text{tol} \\cdot \\max_j |\\theta_j|` (a relative backward
    error: it is an exact eigenpair of a perturbation of :math:`A` of that relative size).
    The check runs after every step (the relation holds throughout), so a run stops as
    soon as the wanted pairs have converged (NOTE [early exit] in the code). Otherwise the
    cycle restarts from the :math:`k + \\lfloor (\\text{ncv} - k) / 2 \\rfloor` most wanted
    Ritz vectors plus the residual direction, which keeps the Lanczos relation exact.

    A warm start ``v0`` (e.g. the eigenvectors of a previous call on a slightly different
    operator) cuts the number of products: a ``[D, m]`` subspace is orthonormalized and its
    directions are summed into the start vector, whose Krylov space recovers a nearly
    invariant subspace within a few steps. (Like every Krylov method, a run cannot see
    eigenvectors its start vector is blind to: a warm start trusts that the old subspace is
    still close to the wanted one.)

    Args:
        A: Symmetric operator (or dense symmetric matrix) of dimension ``D``.
        k: Number of eigenpairs, ``1 <= k < D``.
        which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or ``"LM"``
            (largest magnitude).
        tol: Relative backward error of the accepted pairs. Default:
            :math:`\\varepsilon^{3/4}` of the dtype (about ``2e-12`` in float64).
        max_iter: Maximum number of restart cycles. Default: ``10 * D``.
        ncv: Number of Lanczos vectors per cycle, ``k < ncv <= D``. Default:
            ``min(D, max(2 k + 1, 20))``.
        v0: Warm start: a start vector ``[D]`` or a subspace ``[D, m]``. Default: random.
        generator: Random number generator for the random start vector (and for the
            replacement vectors if the Krylov space becomes invariant). ``None`` draws from
            PyTorch's global generator.
        progressbar: Whether to show a progress bar over the restart cycles.

    Returns:
        The ``k`` eigenvalues ``[k]`` in ascending order (like SciPy), and the corresponding
        orthonormal eigenvectors ``[D, k]`` (flat format).

    Raises:
        ValueError: If ``A`` is not square and symmetric, an option is invalid, or ``v0`` has
            the wrong shape.
        RuntimeError: If the pairs do not converge within ``max_iter`` cycles.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
        >>> evals, evecs = eigsh(A, k=2, which="LA", generator=torch.Generator().manual_seed(0))
        >>> [round(float(e), 8) for e in evals]
        [29.0, 30.0]
    """
    A = as_linear_operator(A)
    D = require_square(A, "eigsh")
    require_self_adjoint(
        A, "eigsh", "For non-symmetric operators, use scipy.sparse.linalg.eigs(A.to_scipy())."
    )
    which = parse_enum(which, Which, "which")
    k = check_positive_int(k, "k")
    if k >= D:
        raise ValueError(
            f"eigsh computes k < D eigenpairs, got k={k} for D={D}. For all eigenpairs use "
            f"torch.linalg.eigh(A.to_dense())."
        )
    ncv = min(D, max(2 * k + 1, 20)) if ncv is None else check_positive_int(ncv, "ncv")
    if not k < ncv <= D:
        raise ValueError(f"ncv must satisfy k < ncv <= D, i.e. {k} < ncv <= {D}, got {ncv}.")
    eps = torch.finfo(A.dtype).eps
    tol = eps**0.75 if tol is None else check_positive_float(tol, "tol")
    max_iter = 10 * D if max_iter is None else check_positive_int(max_iter, "max_iter")

    V = torch.zeros(1, ncv + 1, D, dtype=A.dtype, device=A.device)
    H = torch.zeros(1, ncv, ncv, dtype=A.dtype, device=A.device)
    V[0, 0] = _start_vector(v0, D, A, generator)
    num_kept = 0
    num_restart_kept = min(k + (ncv - k) // 2, ncv - 1)

    converged = False
    for _ in tqdm(range(max_iter), disable=not progressbar, desc="eigsh"):
        breakdown = False
        for j in range(num_kept, ncv):
            beta = lanczos_steps(A, V, H, j, j + 1, generator)[0]
            breakdown = breakdown or bool(beta == 0)
            # NOTE [early exit]: the Lanczos relation holds after every step, so the Ritz
            # pairs can be checked before the cycle is complete. After a breakdown, the
            # space is explored with random vectors up to the end of the cycle first.
            if j + 1 > k and (j + 1 == ncv or not breakdown):
                m = j + 1
                theta, S = torch.linalg.eigh(H[0, :m, :m])
                exhausted = m == D
                residuals = torch.zeros_like(theta) if exhausted else beta.abs() * S[-1].abs()
                order = _preference(theta, which)
                wanted = order[:k]
                scale = theta.abs().max()
                converged = bool((residuals[wanted] <= tol * scale).all())
                if converged:
                    break
        if converged:
            break
        # thick restart from the most wanted Ritz vectors and the residual direction
        keep = order[:num_restart_kept]
        residual_vector = V[0, ncv].clone()
        V[0, :num_restart_kept] = S[:, keep].T @ V[0, :ncv]
        V[0, num_restart_kept] = residual_vector
        V[0, num_restart_kept + 1 :] = 0.0
        H.zero_()
        H[0, :num_restart_kept, :num_restart_kept] = torch.diag(theta[keep])
        coupling = beta * S[-1, keep]
        H[0, :num_restart_kept, num_restart_kept] = coupling
        H[0, num_restart_kept, :num_restart_kept] = coupling
        num_kept = num_restart_kept
    if not converged:
        num_converged = int((residuals[wanted] <= tol * scale).sum())
        raise RuntimeError(
            f"eigsh: only {num_converged} of {k} eigenpairs converged within max_iter="
            f"{max_iter} restart cycles. Increase max_iter or ncv (currently {ncv}), or "
            f"loosen tol (currently {tol:.3g})."
        )

    ascending = wanted[torch.argsort(theta[wanted])]
    eigenvectors = V[0, :m].T @ S[:, ascending]
    return theta[ascending], eigenvectors
