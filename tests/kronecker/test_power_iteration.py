"""The alternating power iteration of KFOC on dense rearranged blocks."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, generator
from helpers.nearest_kronecker import nearest_kronecker, rearrange

from curvops.kronecker.power_iteration import NearestKroneckerIteration


def _psd_block(m: int, n: int, num: int, seed: int) -> torch.Tensor:
    """sum_i vec(G_i) vec(G_i)^T for random gradients G_i [m, n]."""
    G = torch.randn(num, m * n, generator=generator(seed), dtype=DTYPE)
    return G.T @ G


def _run(C, m, n, steps=None, tolerance=1e-12):
    R = rearrange(C, m, n)
    it = NearestKroneckerIteration(torch.eye(n, dtype=DTYPE), (m, m))
    residuals = []
    for _ in range(steps or 500):
        x = it.current.reshape(-1)
        y = R @ x if it.input_side else R.T @ x
        shape = (m, m) if it.input_side else (n, n)
        assert it.zeros_for_product().shape == shape
        it.update(y.reshape(shape))
        residuals.append(it.residual)
        if steps is None and it.converged(tolerance):
            break
    return it, residuals


def test_converges_to_the_nearest_kronecker_product():
    m, n = 3, 4
    C = _psd_block(m, n, num=20, seed=0)
    it, residuals = _run(C, m, n)
    assert it.converged(1e-12) and residuals[0] == float("inf")
    B, A = it.balanced_factors()
    torch.testing.assert_close(torch.kron(B, A), nearest_kronecker(C, m, n), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B.norm(), A.norm())
    for F in (B, A):
        assert torch.equal(F, F.T) and torch.linalg.eigvalsh(F).min() > 0


def test_residual_tracks_the_frobenius_excess():
    """The error above the optimum falls like the residual squared (NOTE [KFOC power iteration])."""
    m, n = 3, 4
    C = _psd_block(m, n, num=6, seed=1)
    best = (C - nearest_kronecker(C, m, n)).norm()
    for steps in (3, 5, 9):
        it, residuals = _run(C, m, n, steps=steps)
        B, A = it.balanced_factors()
        excess = (C - torch.kron(B, A)).norm() - best
        assert 0 <= excess <= 2 * residuals[-1] ** 2 * C.norm(), (steps, excess, residuals[-1])


def test_zero_block_and_errors():
    it = NearestKroneckerIteration(torch.eye(2, dtype=DTYPE), (3, 3))
    with pytest.raises(RuntimeError, match="has not taken a product"):
        it.balanced_factors()
    it.update(torch.zeros(3, 3, dtype=DTYPE))
    assert it.converged_to_zero and it.converged(1e-30)
    B, A = it.balanced_factors()
    assert (B == 0).all() and (A == 0).all()


def test_float32_wide_factor_reaches_round_off():
    """Norms of float32 factors with n^2 = 1M entries are accumulated in float64.

    A float32 accumulation stalled this residual at 2e-6 (2e-4 on a CNN's 2048-wide layer).
    """
    from curvops.kronecker.rearrangement import RowGradients

    n = 1024
    X = torch.rand(64, 1, n, generator=generator(2))
    g = torch.randn(1, 64, 1, 32, generator=generator(3))
    st = RowGradients.from_rows(X, g, 1.0)
    it = NearestKroneckerIteration(torch.eye(n), (32, 32))
    residuals = []
    for _ in range(12):
        it.update(st.rearranged(it.current) if it.input_side else st.rearranged_adjoint(it.current))
        residuals.append(it.residual)
    assert min(residuals) < 5e-7, residuals
