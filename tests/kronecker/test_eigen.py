"""Eigendecompositions of factors: float64 retry and errors naming the layer."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import batches, build, eigh_failing_below_float64, generator
from torch import nn

from curvops.kronecker import KFACInverseLinearOperator, KFACLinearOperator
from curvops.kronecker.eigen import factor_eigh


def spd(n: int, dtype=torch.float64):
    M = torch.randn(n, n, generator=generator(0), dtype=torch.float64)
    return (M @ M.T + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype)


def test_factor_eigh_reconstructs_and_clips():
    A = spd(4)
    lam, Q = factor_eigh(A, what="input factor of Linear 'x'")
    torch.testing.assert_close((Q * lam) @ Q.T, A)
    lam, _ = factor_eigh(torch.zeros(3, 3, dtype=torch.float64) - 1e-18 * torch.eye(3), what="f")
    assert (lam >= 0).all()


def test_failed_decomposition_is_retried_in_float64(monkeypatch):
    eigh_failing_below_float64(monkeypatch)
    A = spd(4, torch.float32)
    lam, Q = factor_eigh(A, what="input factor of Linear 'x'")
    assert lam.dtype == Q.dtype == torch.float32
    torch.testing.assert_close((Q * lam) @ Q.T, A, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"input factor of Linear 'x' \(torch.float32\) failed"):
        factor_eigh(A, what="input factor of Linear 'x'", retry_double_precision=False)


def test_non_finite_factor_is_reported():
    A = spd(3)
    A[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="gradient factor of Conv2d 'c' contains NaN"):
        factor_eigh(A, what="gradient factor of Conv2d 'c'")


def test_inverse_retry_option_reaches_the_decomposition(monkeypatch):
    model = build(lambda: nn.Sequential(nn.Linear(3, 2))).float()
    g = generator(1)
    data = batches(torch.randn(12, 3, generator=g), torch.randn(12, 2, generator=g))
    K = KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, fisher_type="type-2"
    )
    K.compute_factors()
    eigh_failing_below_float64(monkeypatch)
    with pytest.raises(RuntimeError, match="factor of Linear '0'"):
        KFACInverseLinearOperator(
            K, damping=0.1, use_exact_damping=True, retry_double_precision=False
        )
    K_inv = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    assert K_inv.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_factor_has_exact_zero_eigenvalues(dtype):
    """NOTE [numerical rank of factors]: eigenvalues at round-off level become exactly 0."""
    G = torch.randn(2, 6, generator=generator(3), dtype=torch.float64).to(dtype)
    lam, Q = factor_eigh(G.T @ G, what="gradient factor of Linear 'x'")
    assert int((lam == 0).sum()) == 4 and bool((lam[-2:] > 0).all())
    torch.testing.assert_close((Q * lam) @ Q.T, G.T @ G)
