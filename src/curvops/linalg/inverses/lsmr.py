"""(Pseudo-)inverse of any operator via LSMR least-squares solves."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from curvops.linalg._inputs import as_linear_operator
from curvops.linalg.inverses._base import (
    _IterativeInverseLinearOperator,
    check_tolerance_and_max_iter,
    column_norms,
    warn_not_converged,
)
from curvops.linear_operator import LinearOperator


@dataclass
class LSMRInfo:
    """Convergence information of the last LSMR solve (one entry per right-hand side).

    Attributes:
        iterations: Number of LSMR iterations of each column, ``[K]``.
        residual_norms: Final :math:`\\|b - A x\\|` of each column, from the recurrences of
            Fong & Saunders (2011), ``[K]``.
        normal_residual_norms: Final :math:`\\|A^\\top (b - A x)\\|` of each column, ``[K]``.
        converged: Whether each column met a stopping rule, ``[K]``.
        num_matvecs: Total number of columns multiplied with :math:`A` or :math:`A^\\top`.
    """

    iterations: Tensor
    residual_norms: Tensor
    normal_residual_norms: Tensor
    converged: Tensor
    num_matvecs: int


def _safe_divide(x: Tensor, d: Tensor) -> Tensor:
    """``x / d`` with columns of zero ``d`` set to zero (a Golub-Kahan breakdown)."""
    return torch.where(d > 0, x / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(x))


def _hypot(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


class LSMRInverseLinearOperator(_IterativeInverseLinearOperator):
    """:math:`A^{+}` (the pseudo-inverse) of any operator, by LSMR least-squares solves.

    Each product :math:`A^{+} B` solves :math:`\\min_x \\|A x - b\\|_2` for every column
    :math:`b` with LSMR (Fong & Saunders (2011). LSMR: An iterative algorithm for sparse
    least-squares problems. SIAM J. Sci. Comput.), started at :math:`x_0 = 0` so that it
    converges to the minimum-norm solution. LSMR runs Golub-Kahan bidiagonalization
    (:math:`\\beta_1 u_1 = b`, :math:`\\alpha_1 v_1 = A^\\top u_1`,
    :math:`\\beta_{k+1} u_{k+1} = A v_k - \\alpha_k u_k`,
    :math:`\\alpha_{k+1} v_{k+1} = A^\\top u_{k+1} - \\beta_{k+1} v_k`) and minimizes
    :math:`\\|A^\\top r_k\\|` over the Krylov subspace with two Givens QR factorizations; the
    norms :math:`\\|r_k\\|` and :math:`\\|A^\\top r_k\\|` follow from scalar recurrences
    (§3.2-3.4 of the paper). It works for non-symmetric, indefinite and rectangular
    operators. All :math:`K` columns run at once with block products (NOTE [iterative
    inverses] in :mod:`curvops.linalg.inverses._base`); a column stops when, with
    ``tolerance`` :math:`\\tau`, :math:`\\|r_k\\| \\leq \\tau (\\|b\\| + \\|A\\| \\|x_k\\|)`
    (a compatible system is solved) or :math:`\\|A^\\top r_k\\| \\leq \\tau \\|A\\| \\|r_k\\|`
    (a least-squares solution is found), where :math:`\\|A\\|` is the Frobenius norm
    estimate of the bidiagonal matrix.

    Examples:
        >>> import torch
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> A_pinv = LSMRInverseLinearOperator(A, tolerance=1e-12)
        >>> b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> torch.allclose(A_pinv @ b, torch.linalg.pinv(A) @ b)
        True
    """

    def __init__(
        self,
        A: LinearOperator | Tensor,
        *,
        tolerance: float = 1e-6,
        max_iter: int | None = None,
        progressbar: bool = False,
    ):
        """Set up the (pseudo-)inverse (no work is done until the first product).

        Args:
            A: Any operator (or dense matrix) of shape ``[D_out, D_in]``.
            tolerance: Relative tolerance :math:`\\tau` of the stopping rules.
            max_iter: Maximum number of LSMR iterations (two products each). Default:
                :math:`10 \\min(D_\\text{out}, D_\\text{in})`.
            progressbar: Whether to show a progress bar over the iterations.
        """
        A = as_linear_operator(A)
        self._tolerance, self._max_iter = check_tolerance_and_max_iter(
            tolerance, max_iter, 10 * min(A.shape)
        )
        super().__init__(A)
        self._progressbar = progressbar
        self.is_self_adjoint = A.is_self_adjoint
        self.is_psd = A.is_psd
        self.last_info: LSMRInfo | None = None

    def _solve(self, B: Tensor, adjoint: bool) -> Tensor:
        A = self._A.adjoint() if adjoint else self._A
        At = A.adjoint()
        tol = self._tolerance
        K = B.shape[1]
        zeros_k = B.new_zeros(K)
        ones_k = B.new_ones(K)

        # Golub-Kahan start: beta_1 u_1 = b, alpha_1 v_1 = A^T u_1
        beta = column_norms(B)
        U = _safe_divide(B, beta)
        V = At @ U
        num_matvecs = K
        alpha = column_norms(V)
        V = _safe_divide(V, alpha)

        s = {  # state of the active columns, compacted whenever columns converge
            "U": U,
            "V": V,
            "H": V.clone(),
            "Hbar": torch.zeros_like(V),
            "X": torch.zeros_like(V),
            "alpha": alpha,
            "alphabar": alpha.clone(),
            "zetabar": alpha * beta,
            "rho": ones_k.clone(),
            "rhobar": ones_k.clone(),
            "cbar": ones_k.clone(),
            "sbar": zeros_k.clone(),
            # recurrences for ||r_k|| (Fong & Saunders 2011, §3.3)
            "betadd": beta.clone(),
            "betad": zeros_k.clone(),
            "rhodold": ones_k.clone(),
            "tautildeold": zeros_k.clone(),
            "thetatilde": zeros_k.clone(),
            "zetaold": zeros_k.clone(),
            "normA2": alpha**2,
            "b_norm": beta,
        }
        X_out = torch.zeros(A.shape[1], K, dtype=B.dtype, device=B.device)
        iterations = torch.zeros(K, dtype=torch.long, device=B.device)
        r_norms = beta.clone()
        ar_norms = alpha * beta
        converged = (beta == 0) | (alpha == 0)  # x = 0 solves (the normal equations of) these
        idx = torch.arange(K, device=B.device)
        s = self._compact(s, ~converged)
        idx = idx[~converged]

        for _ in tqdm(range(self._max_iter), disable=not self._progressbar, desc="LSMR"):
            if idx.numel() == 0:
                break
            # continue the bidiagonalization
            U = A @ s["V"] - s["alpha"] * s["U"]
            beta = column_norms(U)
            U = _safe_divide(U, beta)
            V = At @ U - beta * s["V"]
            num_matvecs += 2 * idx.numel()
            alpha = column_norms(V)
            V = _safe_divide(V, alpha)
            s["U"], s["V"], s["alpha"] = U, V, alpha
            s["normA2"] = s["normA2"] + beta**2 + alpha**2

            # rotation P_k: eliminate beta_{k+1} from the bidiagonal matrix
            rho = _hypot(s["alphabar"], beta)
            c, sn = s["alphabar"] / rho, beta / rho
            theta_new = sn * alpha
            s["alphabar"] = c * alpha

            # rotation Pbar_k: turn R_k^T into upper-bidiagonal form
            thetabar = s["sbar"] * rho
            rhobar = _hypot(s["cbar"] * rho, theta_new)
            cbar = s["cbar"] * rho / rhobar
            sbar = theta_new / rhobar
            zeta = cbar * s["zetabar"]
            s["zetabar"] = -sbar * s["zetabar"]

            # update h, hbar, x
            s["Hbar"] = s["H"] - (thetabar * rho / (s["rho"] * s["rhobar"])) * s["Hbar"]
            s["X"] = s["X"] + (zeta / (rho * rhobar)) * s["Hbar"]
            s["H"] = V - (theta_new / rho) * s["H"]

            # estimate ||r_k|| by applying the rotations to beta_1 e_1
            betahat = c * s["betadd"]
            s["betadd"] = -sn * s["betadd"]
            rhotildeold = _hypot(s["rhodold"], thetabar)
            ctildeold = s["rhodold"] / rhotildeold
            stildeold = thetabar / rhotildeold
            thetatilde_new = stildeold * rhobar
            s["rhodold"] = ctildeold * rhobar
            s["betad"] = -stildeold * s["betad"] + ctildeold * betahat
            tautildeold = (s["zetaold"] - s["thetatilde"] * s["tautildeold"]) / rhotildeold
            taud = (zeta - thetatilde_new * tautildeold) / s["rhodold"]
            s["tautildeold"], s["thetatilde"], s["zetaold"] = tautildeold, thetatilde_new, zeta
            r_norm = _hypot(s["betad"] - taud, s["betadd"])
            ar_norm = s["zetabar"].abs()

            s["rho"], s["rhobar"], s["cbar"], s["sbar"] = rho, rhobar, cbar, sbar

            # stopping rules
            norm_A = s["normA2"].sqrt()
            x_norm = column_norms(s["X"])
            iterations[idx] += 1
            r_norms[idx], ar_norms[idx] = r_norm, ar_norm
            done = (r_norm <= tol * (s["b_norm"] + norm_A * x_norm)) | (
                ar_norm <= tol * norm_A * r_norm
            )
            if bool(done.any()):
                converged[idx[done]] = True
                X_out[:, idx[done]] = s["X"][:, done]
                s = self._compact(s, ~done)
                idx = idx[~done]
        X_out[:, idx] = s["X"]

        self.last_info = LSMRInfo(iterations, r_norms, ar_norms, converged, num_matvecs)
        if not bool(converged.all()):
            relative = r_norms / torch.where(column_norms(B) > 0, column_norms(B), ones_k)
            warn_not_converged(
                "LSMRInverseLinearOperator",
                int((~converged).sum()),
                K,
                self._max_iter,
                float(relative[~converged].max()),
            )
        return X_out

    @staticmethod
    def _compact(state: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
        """Keep the state of the columns selected by the boolean mask ``keep``."""
        return {name: t[..., keep] for name, t in state.items()}
