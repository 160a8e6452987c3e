"""The leave-one-out sketch shared by XTrace and XDiag (private).

NOTE [leave-one-out sketch]: XTrace and XDiag (Epperly, Tropp, Webber (2024). XTrace: Making
the most of every sample in stochastic trace estimation. SIAM J. Matrix Anal. Appl.) use
test vectors :math:`\\Omega = [\\omega_1, \\dots, \\omega_m]`, the sketch
:math:`Y = A \\Omega = QR` and, for every :math:`i`, the basis :math:`Q_{(i)}` of
:math:`Y` without its column :math:`i`. Within :math:`\\operatorname{range}(Q)`, the
direction removed by dropping column :math:`i` is orthogonal to all other columns of
:math:`R`, i.e. it is the :math:`i`-th column of :math:`R^{-\\top}`. With
:math:`s_i = R^{-\\top} e_i / \\|R^{-\\top} e_i\\|` and :math:`\\tilde q_i = Q s_i`,

.. math::
    Q_{(i)} Q_{(i)}^\\top = Q Q^\\top - \\tilde q_i \\tilde q_i^\\top,

so every leave-one-out quantity follows from :math:`\\Omega, Y, Q, R` and one more block
product :math:`Z = A Q` (or :math:`A^\\top Q`) without further products. The sketch can
grow: new test vectors :math:`\\Omega'` give :math:`Y' = A \\Omega'`, block Gram-Schmidt
against :math:`Q` gives :math:`Q_2 R_2`, and

.. math::
    [Y, Y'] = [Q, Q_2] \\begin{bmatrix} R & Q^\\top Y' \\\\ 0 & R_2 \\end{bmatrix},

so only the new columns :math:`A Q_2` are needed: growing costs exactly what a fresh sketch
of the new size would cost. (:math:`Q_2` comes from a Householder QR of
:math:`[Q, Y'_\\perp]`, which stays orthonormal to :math:`Q` even if the new sketch lies in
the old range, e.g. for low-rank :math:`A`.)

If :math:`A` has rank :math:`r < m` (a GGN with fewer data than parameters is exactly
low-rank), :math:`Y` is rank deficient and the formula above is wrong: :math:`Q` then
holds :math:`m - r` arbitrary directions that depend on every :math:`\\omega_j`.
:meth:`LeaveOneOutSketch.leave_one_out` therefore works in an effective basis
:math:`Q U_r` of :math:`\\operatorname{range}(Y)` (SVD :math:`R = U \\Sigma V^\\top`).
Dropping column :math:`i` lowers the rank only if row :math:`i` of the null-space basis
:math:`V_{:, r:}` vanishes; otherwise :math:`Q_{(i)} = Q U_r` and nothing is removed
(:math:`s_i = 0`); else the removed direction is the one orthogonal to the other columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator


class LeaveOneOutSketch:
    """Test vectors, sketch, QR factors and the products of ``A`` (or ``A^T``) with ``Q``.

    Attributes:
        Omega: Test vectors ``[D, m]``.
        Y: Sketch :math:`A \\Omega`, ``[D, m]``.
        Q: Orthonormal basis ``[D, m]`` of the sketch.
        R: Upper triangular ``[m, m]`` with :math:`Y = QR`.
        Z: :math:`A Q` (or :math:`A^\\top Q` with ``transpose_products``), ``[D, m]``.
        num_matvecs: Number of products spent so far.
    """

    def __init__(self, A: LinearOperator, *, transpose_products: bool):
        """Start an empty sketch.

        Args:
            A: Square operator.
            transpose_products: Whether :attr:`Z` holds :math:`A^\\top Q` instead of
                :math:`A Q`.
        """
        self._A = A
        self._AZ = A.adjoint() if transpose_products else A
        D = A.shape[1]
        empty = torch.zeros(D, 0, dtype=A.dtype, device=A.device)
        self.Omega, self.Y, self.Q, self.Z = empty, empty, empty, empty
        self.R = torch.zeros(0, 0, dtype=A.dtype, device=A.device)
        self.num_matvecs = 0

    @property
    def size(self) -> int:
        """Number of test vectors :math:`m`."""
        return self.Omega.shape[1]

    def grow(self, Omega_new: Tensor) -> None:
        """Add test vectors (two block products of their number of columns)."""
        Y_new = self._A @ Omega_new
        C = self.Q.T @ Y_new
        Y_perp = Y_new - self.Q @ C
        C2 = self.Q.T @ Y_perp  # reorthogonalize once ("twice is enough")
        Y_perp = Y_perp - self.Q @ C2
        m, n = self.size, Omega_new.shape[1]
        # Householder QR of [Q, Y_perp]: its Q factor is orthonormal even if Y_perp is
        # (numerically) zero or rank deficient, so the new directions stay orthogonal to Q
        Q_full, R_full = torch.linalg.qr(torch.cat([self.Q, Y_perp], dim=1))
        Q2, R2 = Q_full[:, m:], R_full[m:, m:]
        R = torch.zeros(m + n, m + n, dtype=self.R.dtype, device=self.R.device)
        R[:m, :m], R[:m, m:], R[m:, m:] = self.R, C + C2, R2
        self.Omega = torch.cat([self.Omega, Omega_new], dim=1)
        self.Y = torch.cat([self.Y, Y_new], dim=1)
        self.Q = torch.cat([self.Q, Q2], dim=1)
        self.R = R
        self.Z = torch.cat([self.Z, self._AZ @ Q2], dim=1)
        self.num_matvecs += 2 * n

    def leave_one_out(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Effective basis and removed directions (NOTE [leave-one-out sketch]).

        Returns:
            ``(Q, Z, R, S)``: an orthonormal basis ``[D, r]`` of the sketch's range, the
            products of ``A`` (or ``A^T``) with it ``[D, r]``, the coefficients ``[r, m]`` of
            the sketch in it (``Y = Q R``), and the removed directions ``[r, m]`` (zero
            columns where dropping a test vector keeps the range).
        """
        m = self.size
        U, sigma, Vh = torch.linalg.svd(self.R)
        eps = torch.finfo(self.R.dtype).eps
        tol = 100 * m * eps * sigma[0] if m else 0.0
        r = int((sigma > tol).sum())
        if r == m:
            return self.Q, self.Z, self.R, self.removed_directions()
        U_r = U[:, :r]
        R_eff = U_r.T @ self.R
        null_rows = torch.linalg.vector_norm(Vh[r:].T, dim=1)
        S = torch.zeros(r, m, dtype=self.R.dtype, device=self.R.device)
        keep = torch.ones(m, dtype=torch.bool, device=self.R.device)
        for i in torch.nonzero(null_rows <= eps**0.5).flatten().tolist():
            keep[i] = False
            left, _, _ = torch.linalg.svd(R_eff[:, keep])  # rank r - 1: last column is removed
            S[:, i] = left[:, -1]
            keep[i] = True
        return self.Q @ U_r, self.Z @ U_r, R_eff, S

    def removed_directions(self) -> Tensor:
        """The unit vectors :math:`s_i` of NOTE [leave-one-out sketch] as columns, ``[m, m]``."""
        R = self.R
        diag = torch.diagonal(R)
        largest = diag.abs().max()
        floor = torch.finfo(R.dtype).eps * (largest if bool(largest > 0) else 1.0)
        sign = torch.where(diag < 0, -1.0, 1.0).to(R.dtype)
        R = R - torch.diag(diag) + torch.diag(sign * torch.clamp(diag.abs(), min=floor))
        eye = torch.eye(self.size, dtype=R.dtype, device=R.device)
        R_inv_T = torch.linalg.solve_triangular(R.T, eye, upper=False)
        return R_inv_T / torch.linalg.vector_norm(R_inv_T, dim=0)
