r"""(Pseudo-)inverse of any operator via (right-preconditioned) LSMR least-squares solves.

NOTE [right preconditioning of LSMR]: a preconditioner :math:`P \approx A^{-1}` (shape
:math:`D_\text{in} \times D_\text{out}`, as for CG and Neumann) enters LSMR from the right:
LSMR solves

.. math::
    \min_y \|A P y - b\|_2, \qquad x = P y,

i.e. it runs unchanged on the operator :math:`\tilde A = A P` (products
:math:`A (P v)` and :math:`P^\top (A^\top u)`), and maps its solution back with one more
product with :math:`P`. Right preconditioning keeps the residual :math:`b - A x = b - \tilde
A y` of the original problem, so every least-squares solution of :math:`\tilde A` gives one of
:math:`A`; a *left* preconditioner would change the norm that is minimised and hence the
least-squares solution of an incompatible system (Paige, C. C., Saunders, M. A. (1982). LSQR:
An algorithm for sparse linear equations and sparse least squares, §1; Fong, D. C.-L.,
Saunders, M. A. (2011). LSMR: An iterative algorithm for sparse least-squares problems, §1).
LSMR then converges at the rate set by the singular values of :math:`A P` instead of
:math:`A` (e.g. a damped KFAC inverse for a damped GGN). The stopping rules apply to
:math:`\tilde A` (its norm estimate and normal residual :math:`\|P^\top A^\top r\|`).
For a nonsingular (or full column rank) :math:`A` and a nonsingular :math:`P` the result is
:math:`A^{+} b`, the same as without a preconditioner. For a rank-deficient :math:`A`
(e.g. an undamped GGN), :math:`x = P y` with the minimum-norm :math:`y` is a least-squares
solution, but in general not the minimum-norm one :math:`A^{+} b`: damp such operators, or
solve without a preconditioner. A square system that LSMR finds incompatible with a
preconditioner (it stops on the least-squares rule, so :math:`A P` is singular to the
tolerance) raises a warning saying so. Adjoint products solve with :math:`A^\top` and the
preconditioner :math:`P^\top`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from curvops.linalg._inputs import as_linear_operator
from curvops.linalg.inverses._base import (
    _IterativeInverseLinearOperator,
    check_preconditioner,
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
        normal_residual_norms: Final :math:`\\|A^\\top (b - A x)\\|` of each column, ``[K]``;
            with a preconditioner :math:`P`, :math:`\\|P^\\top A^\\top (b - A x)\\|` (the
            normal residual of the preconditioned problem, NOTE [right preconditioning of
            LSMR]).
        converged: Whether each column met a stopping rule, ``[K]``.
        num_matvecs: Total number of columns multiplied with :math:`A` or :math:`A^\\top`
            (products with a preconditioner are not counted).
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

    An optional preconditioner :math:`P \\approx A^{-1}` (any operator or dense matrix of
    shape :math:`D_\\text{in} \\times D_\\text{out}`, e.g. a damped KFAC inverse) is applied
    from the right, :math:`\\min_y \\|A P y - b\\|`, :math:`x = P y` (NOTE [right
    preconditioning of LSMR] in this module): the same solution for a nonsingular (full column
    rank) :math:`A`, in fewer iterations when :math:`A P` is better conditioned than
    :math:`A`. Each iteration then also multiplies with :math:`P` and :math:`P^\\top`.

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
        preconditioner: LinearOperator | Tensor | None = None,
        progressbar: bool = False,
    ):
        """Set up the (pseudo-)inverse (no work is done until the first product).

        Args:
            A: Any operator (or dense matrix) of shape ``[D_out, D_in]``.
            tolerance: Relative tolerance :math:`\\tau` of the stopping rules.
            max_iter: Maximum number of LSMR iterations (two products each). Default:
                :math:`10 \\min(D_\\text{out}, D_\\text{in})`.
            preconditioner: Optional right preconditioner :math:`P \\approx A^{-1}` of shape
                ``[D_in, D_out]`` (NOTE [right preconditioning of LSMR]).
            progressbar: Whether to show a progress bar over the iterations.

        Raises:
            ValueError: If the preconditioner's shape, dtype or device does not match ``A``.
        """
        A = as_linear_operator(A)
        self._tolerance, self._max_iter = check_tolerance_and_max_iter(
            tolerance, max_iter, 10 * min(A.shape)
        )
        P = check_preconditioner(preconditioner, A)
        super().__init__(A)
        self._P = P
        self._progressbar = progressbar
        self.is_self_adjoint = A.is_self_adjoint
        self.is_psd = A.is_psd
        self.last_info: LSMRInfo | None = None

    @property
    def preconditioner(self) -> LinearOperator | None:
        """The right preconditioner :math:`P`, or ``None``."""
        return self._P

    def _solve(self, B: Tensor, adjoint: bool) -> Tensor:
        A = self._A.adjoint() if adjoint else self._A
        P = None if self._P is None else (self._P.adjoint() if adjoint else self._P)
        At, Pt = A.adjoint(), None if P is None else P.adjoint()

        def A_times(V: Tensor) -> Tensor:  # (A P) V
            return A @ (V if P is None else P @ V)

        def At_times(U: Tensor) -> Tensor:  # (A P)^T U
            return At @ U if Pt is None else Pt @ (At @ U)

        Y, incompatible = self._lsmr(
            A_times, At_times, B, D=A.shape[1] if P is None else P.shape[1]
        )
        if P is None:
            return Y
        if A.shape[0] == A.shape[1] and bool(incompatible.any()):
            self._warn_singular(int(incompatible.sum()), B.shape[1])
        return P @ Y

    def _lsmr(self, A_times, At_times, B: Tensor, D: int) -> tuple[Tensor, Tensor]:
        """Run LSMR on the operator whose products are ``A_times`` and ``At_times``.

        Args:
            A_times: Block product with the (preconditioned) operator.
            At_times: Block product with its transpose.
            B: Right-hand sides ``[D_out, K]``.
            D: Input dimension of the operator.

        Returns:
            The solutions ``[D, K]``, and which columns stopped on the least-squares rule
            only (an incompatible system), ``[K]``.
        """
        tol = self._tolerance
        K = B.shape[1]
        zeros_k = B.new_zeros(K)
        ones_k = B.new_ones(K)

        # Golub-Kahan start: beta_1 u_1 = b, alpha_1 v_1 = A^T u_1
        beta = column_norms(B)
        U = _safe_divide(B, beta)
        V = At_times(U)
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
        X_out = torch.zeros(D, K, dtype=B.dtype, device=B.device)
        iterations = torch.zeros(K, dtype=torch.long, device=B.device)
        r_norms = beta.clone()
        ar_norms = alpha * beta
        converged = (beta == 0) | (alpha == 0)  # x = 0 solves (the normal equations of) these
        incompatible = (beta > 0) & (alpha == 0)  # b is orthogonal to the range
        idx = torch.arange(K, device=B.device)
        s = self._compact(s, ~converged)
        idx = idx[~converged]

        for _ in tqdm(range(self._max_iter), disable=not self._progressbar, desc="LSMR"):
            if idx.numel() == 0:
                break
            # continue the bidiagonalization
            U = A_times(s["V"]) - s["alpha"] * s["U"]
            beta = column_norms(U)
            U = _safe_divide(U, beta)
            V = At_times(U) - beta * s["V"]
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
            compatible = r_norm <= tol * (s["b_norm"] + norm_A * x_norm)
            done = compatible | (ar_norm <= tol * norm_A * r_norm)
            if bool(done.any()):
                converged[idx[done]] = True
                incompatible[idx[done & ~compatible]] = True
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
        return X_out, incompatible

    def _warn_singular(self, num: int, K: int) -> None:
        """Warn that a preconditioned square system was found incompatible (singular)."""
        warnings.warn(
            f"LSMRInverseLinearOperator stopped on the least-squares rule for {num} of {K} "
            f"right-hand sides: the square operator A P is singular to the tolerance, so A "
            f"is (numerically) singular. With a preconditioner P the result x = P y is a "
            f"least-squares solution, but not the minimum-norm one A^+ b (NOTE [right "
            f"preconditioning of LSMR]). Add damping to A, or drop the preconditioner to get "
            f"the pseudo-inverse.",
            RuntimeWarning,
            stacklevel=4,
        )

    @staticmethod
    def _compact(state: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
        """Keep the state of the columns selected by the boolean mask ``keep``."""
        return {name: t[..., keep] for name, t in state.items()}
