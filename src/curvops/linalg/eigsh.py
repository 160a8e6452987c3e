"""Extreme eigenpairs of a symmetric operator by thick-restart block Lanczos, in PyTorch."""

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
from curvops.structured import TensorLinearOperator


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
        return torch.argsort(theta, descending=True, stable=True)
    if which == Which.SA:
        return torch.argsort(theta, stable=True)
    return torch.argsort(theta.abs(), descending=True, stable=True)


def _require_finite_matrix(A: object) -> None:
    """Reject a dense matrix (or a wrapped one) with NaN or Inf entries.

    Raises:
        ValueError: If the matrix contains NaN or Inf.
    """
    matrix = A.matrix if isinstance(A, TensorLinearOperator) else A
    if isinstance(matrix, Tensor) and not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            "eigsh: the matrix A contains NaN or Inf entries, so it has no eigenvalues. "
            "Check where it was computed (e.g. the model and data), or use float64."
        )


def _start_block(
    v0: Tensor | None, D: int, b: int, A: LinearOperator, generator: torch.Generator | None
) -> Tensor:
    """Turn the warm start (``None``, ``[D]`` or ``[D, m]``) into ``b`` orthonormal columns.

    NOTE [warm start block]: the start block spans the warm start. A ``[D, m]`` subspace with
    ``m <= b`` columns is completed by random directions; one with ``m > b`` columns is folded
    into ``b`` columns (column ``c`` sums the directions ``i`` with ``i mod b = c``, for
    ``b = 1`` the sum of all). If the subspace is (nearly) invariant, the block Krylov space of
    the folded block recovers it within ``ceil(m / b)`` block steps.
    """
    if v0 is None:
        X = random_test_matrix(D, b, Distribution.NORMAL, generator, A.dtype, A.device)
    else:
        if not isinstance(v0, Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != D:
            got = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
            raise ValueError(
                f"v0 must be a tensor of shape [{D}] (a start vector) or [{D}, m] (a subspace, "
                f"e.g. previous eigenvectors), got {got}."
            )
        v0 = v0.to(dtype=A.dtype, device=A.device)
        norm = torch.linalg.vector_norm(v0)
        if not bool(norm > 0) or not bool(torch.isfinite(norm)):
            raise ValueError("v0 must be non-zero and finite.")
        X = v0.unsqueeze(1) if v0.ndim == 1 else torch.linalg.qr(v0)[0]
        m = X.shape[1]
        if m > b:
            fold = torch.zeros(m, b, dtype=X.dtype, device=X.device)
            fold[torch.arange(m), torch.arange(m) % b] = 1.0
            X = X @ fold
        elif m < b:
            extra = random_test_matrix(D, b - m, Distribution.NORMAL, generator, A.dtype, A.device)
            X = torch.cat([X, extra], dim=1)
    if b == 1:
        return X / torch.linalg.vector_norm(X)
    return torch.linalg.qr(X)[0]


def _restart_size(k: int, ncv: int, b: int) -> int:
    """Number of Ritz vectors kept at a thick restart.

    About half of the free space beyond ``k``, as in Wu & Simon (2000), rounded so that a cycle
    expands the basis by whole blocks where that is possible.
    """
    keep = min(k + (ncv - k) // 2, ncv - 1)
    expand = ncv - keep
    if expand >= b:
        keep = ncv - b * (expand // b)
    return keep


def eigsh(
    A: LinearOperator | Tensor,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    progressbar: bool = False,
) -> tuple[Tensor, Tensor]:
    """Compute ``k`` extreme eigenpairs of a symmetric operator (like ``scipy``'s ``eigsh``).

    Thick-restart (Wu & Simon (2000). Thick-restart Lanczos method for large symmetric
    eigenvalue problems. SIAM J. Matrix Anal. Appl.) block Lanczos (Golub & Underwood (1977).
    The block Lanczos method for computing eigenvalues. Mathematical Software III) with full
    reorthogonalization (NOTE [Lanczos basis] in :mod:`curvops.linalg.lanczos`), in PyTorch on
    the operator's device.

    **Repeated eigenvalues.** A Krylov space grown from ``b`` start vectors contains at most
    ``b`` independent eigenvectors of one eigenvalue (exactly
    :math:`\\min(b, \\text{multiplicity})` for generic starts): single-vector Lanczos finds one
    copy of a repeated eigenvalue and silently reports the next distinct eigenvalue instead of
    the other copies (Saad (2011). Numerical Methods for Large Eigenvalue Problems, Sec. 6.9).
    The default block size ``b = k`` therefore finds every copy of every wanted eigenvalue,
    e.g. ``k`` zeros of a GGN with a null space of dimension ``>= k``. A smaller
    ``block_size`` saves products when the spectrum is known to be simple, but may miss
    copies of eigenvalues with multiplicity above it.

    **Cost.** Each cycle expands the basis to ``ncv`` vectors; the products of ``b``
    consecutive basis vectors share one block product (``b`` columns), which for curvature
    operators costs less per column than single products (they are batched), in particular
    on GPUs. On spectra with well-separated eigenvalues, block Lanczos needs more columns
    than single-vector Lanczos (``block_size=1``), but fewer block products. The Ritz pairs
    :math:`(\\theta_i, y_i)` of :math:`H = V^\\top A V` have the residual norms
    :math:`\\|A y_i - \\theta_i y_i\\| = \\|C s_i\\|` without further products, with
    :math:`s_i` the eigenvector of :math:`H` and :math:`C` the coupling of the basis to the
    next block. A Ritz pair is accepted once
    :math:`\\|C s_i\\| \\leq \\text{tol} \\cdot \\max_j |\\theta_j|` (a relative backward
    error: it is an exact eigenpair of a perturbation of :math:`A` of that relative size).
    The check runs after every block product (the relation holds throughout), so a run stops
    as soon as the wanted pairs have converged (NOTE [early exit] in the code). Otherwise the
    cycle restarts from about :math:`k + (\\text{ncv} - k) / 2` most wanted Ritz vectors plus
    the next block, which keeps the Lanczos relation exact. If the wanted pairs have not
    converged after ``max_iter`` cycles, a ``RuntimeError`` says how many have.

    **Null spaces.** The Krylov space of an operator of rank :math:`r` becomes invariant
    after at most :math:`r + b` vectors, so with ``ncv >= r + b`` the null space (``which="SA"``
    on a GGN or Fisher) is found within one cycle. With a smaller basis, restarts converge
    slowly when tiny nonzero eigenvalues sit next to the zeros, as they do for GGNs (a
    backward error of ``tol`` must resolve them); increase ``ncv`` or loosen ``tol``.

    A warm start ``v0`` (e.g. the eigenvectors of a previous call on a slightly different
    operator) cuts the number of products: a ``[D, m]`` subspace becomes the start block
    (completed by random directions if ``m < b``, folded into ``b`` columns if ``m > b``;
    NOTE [warm start block]), and its block Krylov space recovers a nearly invariant subspace
    within a few steps. (Like every Krylov method, a run cannot see eigenvectors its start
    block is blind to: a warm start trusts that the old subspace is still close to the
    wanted one.)

    Args:
        A: Symmetric operator (or dense symmetric matrix) of dimension ``D``.
        k: Number of eigenpairs, ``1 <= k < D``.
        which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or ``"LM"``
            (largest magnitude).
        tol: Relative backward error of the accepted pairs. Default:
            :math:`\\varepsilon^{3/4}` of the dtype (about ``2e-12`` in float64).
        max_iter: Maximum number of restart cycles. Default: ``10 * D``.
        ncv: Number of Lanczos vectors per cycle, ``k < ncv <= D`` and ``ncv = D`` or
            ``ncv + b <= D``; the basis holds ``ncv + b`` vectors of size ``D``. Default:
            ``max(2 k + 1, 20, k + 8 b)``, or ``D`` if that leaves no room for a block.
        v0: Warm start: a start vector ``[D]`` or a subspace ``[D, m]``. Default: random.
        block_size: Number of start vectors :math:`b` and of columns per product,
            ``1 <= b <= ncv``; every eigenvalue of multiplicity up to ``b`` is found with all
            its copies. Default: ``k``. ``1`` is single-vector Lanczos.
        generator: Random number generator for the random start block (and for the
            replacement vectors if the Krylov space becomes invariant). ``None`` draws from
            PyTorch's global generator.
        progressbar: Whether to show a progress bar over the restart cycles.

    Returns:
        The ``k`` eigenvalues ``[k]`` in ascending order (like SciPy), and the corresponding
        orthonormal eigenvectors ``[D, k]`` (flat format). For a repeated eigenvalue, the
        eigenvectors are an orthonormal basis of (a part of, if the copies extend beyond the
        ``k`` wanted ones) its eigenspace.

    Raises:
        ValueError: If ``A`` is not square and symmetric, a dense ``A`` contains NaN or Inf,
            an option is invalid, or ``v0`` has the wrong shape.
        FloatingPointError: If a product of the operator contains NaN or Inf.
        RuntimeError: If the pairs do not converge within ``max_iter`` cycles.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 4.0], dtype=torch.float64))
        >>> evals, evecs = eigsh(A, k=3, which="LA", generator=torch.Generator().manual_seed(0))
        >>> [round(float(e), 8) for e in evals]
        [3.0, 3.0, 4.0]
    """
    _require_finite_matrix(A)
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
    b = k if block_size is None else check_positive_int(block_size, "block_size")
    if ncv is None:
        ncv = max(2 * k + 1, 20, k + 8 * b)
        ncv = D if ncv + b > D else ncv  # the next block must fit into the space
    else:
        ncv = check_positive_int(ncv, "ncv")
    if not k < ncv <= D:
        raise ValueError(f"ncv must satisfy k < ncv <= D, i.e. {k} < ncv <= {D}, got {ncv}.")
    if b > ncv:
        raise ValueError(
            f"block_size must be at most ncv={ncv} (the number of Lanczos vectors per cycle), "
            f"got {b}. Increase ncv or reduce block_size."
        )
    if ncv < D < ncv + b:
        raise ValueError(
            f"The basis of ncv={ncv} vectors plus the next block of block_size={b} vectors "
            f"must fit into the space of dimension D={D}: use ncv={D} or ncv <= {D - b}."
        )
    eps = torch.finfo(A.dtype).eps
    tol = eps**0.75 if tol is None else check_positive_float(tol, "tol")
    max_iter = 10 * D if max_iter is None else check_positive_int(max_iter, "max_iter")

    # basis: ncv multiplied vectors plus the next block; H: their projections and couplings
    V = torch.zeros(1, ncv + b, D, dtype=A.dtype, device=A.device)
    H = torch.zeros(1, ncv + b, ncv + b, dtype=A.dtype, device=A.device)
    V[0, :b] = _start_block(v0, D, b, A, generator).T
    num_kept = 0
    num_restart_kept = _restart_size(k, ncv, b)

    converged = False
    for _ in tqdm(range(max_iter), disable=not progressbar, desc="eigsh"):
        breakdown = False
        m = num_kept
        while m < ncv:
            step_stop = min(m + b, ncv)
            broken = lanczos_steps(A, V, H, m, step_stop, generator, b)
            breakdown = breakdown or bool(broken.any())
            m = step_stop
            # NOTE [early exit]: the Lanczos relation holds after every block product, so the
            # Ritz pairs can be checked before the cycle is complete. After a breakdown, the
            # space is explored with random vectors up to the end of the cycle first.
            if m >= k and (m == ncv or not breakdown):
                theta, S = torch.linalg.eigh(H[0, :m, :m])
                if m == D:  # the basis spans the whole space
                    residuals = torch.zeros_like(theta)
                else:
                    residuals = torch.linalg.vector_norm(H[0, m : m + b, :m] @ S, dim=0)
                order = _preference(theta, which)
                wanted = order[:k]
                scale = theta.abs().max()
                converged = bool((residuals[wanted] <= tol * scale).all())
                if converged:
                    break
        if converged:
            break
        # thick restart from the most wanted Ritz vectors and the next block
        keep = order[:num_restart_kept]
        coupling = H[0, m : m + b, :m] @ S[:, keep]
        next_block = V[0, m : m + b].clone()
        V[0, :num_restart_kept] = S[:, keep].T @ V[0, :m]
        V[0, num_restart_kept : num_restart_kept + b] = next_block
        V[0, num_restart_kept + b :] = 0.0
        H.zero_()
        H[0, :num_restart_kept, :num_restart_kept] = torch.diag(theta[keep])
        H[0, num_restart_kept : num_restart_kept + b, :num_restart_kept] = coupling
        H[0, :num_restart_kept, num_restart_kept : num_restart_kept + b] = coupling.T
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
