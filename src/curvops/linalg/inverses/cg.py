"""Inverse of a symmetric positive definite operator via block conjugate gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from curvops.linalg._inputs import as_linear_operator, require_self_adjoint, require_square
from curvops.linalg.inverses._base import (
    _IterativeInverseLinearOperator,
    check_preconditioner,
    check_tolerance_and_max_iter,
    column_norms,
    warn_not_converged,
)
from curvops.linear_operator import LinearOperator


@dataclass
class CGInfo:
    """Convergence information of the last CG solve (one entry per right-hand side).

    Attributes:
        iterations: Number of CG iterations of each column, ``[K]``.
        relative_residuals: Final :math:`\\|b - A x\\| / \\|b\\|` of each column (from the
            recursively updated residual), ``[K]``.
        converged: Whether each column reached the tolerance, ``[K]``.
        num_matvecs: Total number of columns multiplied with :math:`A` (the cost).
    """

    iterations: Tensor
    relative_residuals: Tensor
    converged: Tensor
    num_matvecs: int


class CGInverseLinearOperator(_IterativeInverseLinearOperator):
    """:math:`A^{-1}` for symmetric positive definite :math:`A`, by (preconditioned) CG.

    Each product :math:`A^{-1} B` runs the preconditioned conjugate gradient method
    (Hestenes & Stiefel (1952). Methods of conjugate gradients for solving linear systems)
    on all :math:`K` columns of :math:`B` at once: every column has its own step sizes
    :math:`\\alpha, \\beta`, while the products with :math:`A` are block products on the
    still-active columns (NOTE [iterative inverses] in :mod:`curvops.linalg.inverses._base`).
    Starting from :math:`x_0 = 0`, a column stops once
    :math:`\\|b - A x_k\\| \\leq \\text{tolerance} \\cdot \\|b\\|`.

    With a preconditioner :math:`P \\approx A^{-1}` (symmetric positive definite, e.g. a
    KFAC inverse or any other :class:`~curvops.LinearOperator`), the iteration is

    .. math::
        z_k = P r_k,\\quad \\beta_k = \\frac{r_k^\\top z_k}{r_{k-1}^\\top z_{k-1}},\\quad
        p_k = z_k + \\beta_k p_{k-1},\\quad
        \\alpha_k = \\frac{r_k^\\top z_k}{p_k^\\top A p_k}.

    If a search direction has non-positive curvature :math:`p^\\top A p \\leq 0`, the
    operator is not positive definite and the solve stops with an error instead of
    returning garbage.

    Examples:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> A_inv = CGInverseLinearOperator(A, tolerance=1e-10)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> torch.allclose(A_inv @ b, torch.linalg.solve(A, b))
        True
    """

    is_self_adjoint = True

    def __init__(
        self,
        A: LinearOperator | Tensor,
        *,
        tolerance: float = 1e-6,
        max_iter: int | None = None,
        preconditioner: LinearOperator | Tensor | None = None,
        progressbar: bool = False,
    ):
        """Set up the inverse (no work is done until the first product).

        Args:
            A: Symmetric positive definite operator (or dense matrix) to invert.
            tolerance: Relative residual :math:`\\|b - Ax\\| / \\|b\\|` at which a column
                stops.
            max_iter: Maximum number of CG iterations. Default: :math:`10 D`.
            preconditioner: Optional symmetric positive definite :math:`P \\approx A^{-1}`.
            progressbar: Whether to show a progress bar over the iterations.

        Raises:
            ValueError: If ``A`` is not square or not symmetric, or the preconditioner does
                not match ``A``.
        """
        A = as_linear_operator(A)
        D = require_square(A, "CGInverseLinearOperator")
        require_self_adjoint(
            A,
            "CGInverseLinearOperator",
            "Use LSMRInverseLinearOperator for non-symmetric operators, or invert the "
            "symmetric A.T @ A.",
        )
        self._tolerance, self._max_iter = check_tolerance_and_max_iter(tolerance, max_iter, 10 * D)
        P = check_preconditioner(preconditioner, A)
        if P is not None:
            require_self_adjoint(
                P,
                "The preconditioner of CGInverseLinearOperator",
                "Pass a symmetric positive definite approximation of A^{-1}.",
            )
        super().__init__(A)
        self._P = P
        self._progressbar = progressbar
        self.is_psd = A.is_psd
        self.last_info: CGInfo | None = None

    def _solve(self, B: Tensor, adjoint: bool) -> Tensor:
        A, P = self._A, self._P
        K = B.shape[1]
        X = torch.zeros_like(B)
        b_norm = column_norms(B)
        iterations = torch.zeros(K, dtype=torch.long, device=B.device)
        rel_res = torch.zeros(K, dtype=B.dtype, device=B.device)
        converged = b_norm == 0  # zero right-hand sides are solved by x = 0
        num_matvecs = 0

        # state of the active columns (compacted whenever columns converge)
        idx = (~converged).nonzero().squeeze(1)
        R = B[:, idx]
        Z = R if P is None else P @ R
        rz = self._check_preconditioned_norm((R * Z).sum(0))
        Pdir = Z.clone()
        rel_res[idx] = 1.0
        threshold = self._tolerance * b_norm[idx]

        for it in tqdm(range(self._max_iter), disable=not self._progressbar, desc="CG"):
            if idx.numel() == 0:
                break
            AP = A @ Pdir
            num_matvecs += idx.numel()
            curvature = (Pdir * AP).sum(0)
            self._check_curvature(curvature, it)
            alpha = rz / curvature
            X[:, idx] += alpha * Pdir
            R = R - alpha * AP
            r_norm = column_norms(R)
            rel_res[idx] = r_norm / b_norm[idx]
            iterations[idx] += 1
            done = r_norm <= threshold
            if bool(done.any()):
                converged[idx[done]] = True
                keep = ~done
                idx, R, Pdir, rz, threshold = (
                    idx[keep],
                    R[:, keep],
                    Pdir[:, keep],
                    rz[keep],
                    (threshold[keep]),
                )
                if idx.numel() == 0:
                    break
            Z = R if P is None else P @ R
            rz_new = self._check_preconditioned_norm((R * Z).sum(0))
            Pdir = Z + (rz_new / rz) * Pdir
            rz = rz_new

        self.last_info = CGInfo(iterations, rel_res, converged, num_matvecs)
        if not bool(converged.all()):
            warn_not_converged(
                "CGInverseLinearOperator",
                int((~converged).sum()),
                K,
                self._max_iter,
                float(rel_res[~converged].max()),
            )
        return X

    @staticmethod
    def _check_curvature(curvature: Tensor, iteration: int) -> None:
        """Raise if a search direction has non-positive curvature :math:`p^\\top A p`."""
        if bool((curvature <= 0).any()):
            worst = float(curvature.min())
            raise ValueError(
                f"CG met non-positive curvature p^T A p = {worst:.3g} <= 0 in iteration "
                f"{iteration + 1}: the operator is not positive definite, so CG cannot invert "
                f"it. Add damping (invert A + delta * I with delta larger than |lambda_min|), "
                f"or use LSMRInverseLinearOperator (or MINRES via A.to_scipy()) for indefinite "
                f"systems."
            )

    def _check_preconditioned_norm(self, rz: Tensor) -> Tensor:
        """Raise if :math:`r^\\top P r \\leq 0` for a non-zero residual (P not PD)."""
        if self._P is not None and bool((rz <= 0).any()):
            raise ValueError(
                f"The preconditioner is not positive definite: r^T P r = {float(rz.min()):.3g} "
                f"<= 0 for a residual r. CG needs a symmetric positive definite preconditioner "
                f"(e.g. a damped KFAC inverse)."
            )
        return rz
