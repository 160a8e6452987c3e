"""Tests of the (block) Lanczos process ``curvops.linalg.lanczos``."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, generator, random_indefinite

from curvops.linalg import lanczos_approximate_spectrum
from curvops.linalg.lanczos import lanczos_steps, lanczos_tridiagonalization
from curvops.structured import TensorLinearOperator


def _block_lanczos(M, b, num_steps, seed):
    """Run ``num_steps`` block Lanczos steps of block size ``b`` from a random start block."""
    D = M.shape[0]
    X0 = torch.linalg.qr(torch.randn(D, b, generator=generator(seed), dtype=DTYPE))[0]
    V = torch.zeros(1, num_steps + b, D, dtype=DTYPE)
    H = torch.zeros(1, num_steps + b, num_steps + b, dtype=DTYPE)
    V[0, :b] = X0.T
    A = counting(M)
    breakdown = lanczos_steps(A, V, H, 0, num_steps, generator(seed + 1), b)
    return V[0].T, H[0], X0, A, breakdown


@pytest.mark.parametrize("b", [1, 3])
def test_block_lanczos_relation_and_krylov_space(b):
    """A V_m = V_m H_m + V_next C_m, H_m banded, span(V_m) the block Krylov space."""
    M = random_indefinite(40, seed=0)
    m = 4 * b
    V, H, X0, A, breakdown = _block_lanczos(M, b, m, seed=1)
    assert not breakdown.any()
    assert A.num_calls == m // b and A.num_columns == m  # one block product per b steps
    torch.testing.assert_close(V.T @ V, torch.eye(m + b, dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close(M @ V[:, :m], V @ H[:, :m], rtol=0, atol=1e-12)
    torch.testing.assert_close(H[:m, :m], V[:, :m].T @ M @ V[:, :m], rtol=0, atol=1e-12)
    rows, cols = torch.meshgrid(torch.arange(m + b), torch.arange(m), indexing="ij")
    assert H[:, :m][(rows - cols).abs() > b].abs().max() < 1e-12  # band of width b
    krylov = torch.cat([torch.linalg.matrix_power(M, i) @ X0 for i in range(m // b)], dim=1)
    Q = torch.linalg.qr(krylov)[0]
    torch.testing.assert_close(Q @ (Q.T @ V[:, :m]), V[:, :m], rtol=0, atol=1e-8)


def test_block_lanczos_sees_every_copy_of_a_repeated_eigenvalue():
    """Ritz values of a block of b vectors contain b copies of a b-fold eigenvalue."""
    lam = torch.linspace(0.0, 1.0, 50, dtype=DTYPE)
    lam[-3:] = 2.0
    Q = torch.linalg.qr(torch.randn(50, 50, generator=generator(2), dtype=DTYPE))[0]
    M = (Q * lam) @ Q.T
    M = 0.5 * (M + M.T)
    for seed in range(5):
        _, H, _, _, _ = _block_lanczos(M, 3, 30, seed=seed)
        theta = torch.linalg.eigvalsh(H[:30, :30])
        torch.testing.assert_close(theta[-3:], lam[-3:], rtol=0, atol=1e-10)


def test_breakdown_is_flagged_and_relation_stays_exact():
    U = torch.randn(30, 2, generator=generator(4), dtype=DTYPE)
    M = U @ U.T  # rank 2: the block Krylov space of 2 vectors is invariant after 4 columns
    V, H, _, _, breakdown = _block_lanczos(M, 2, 8, seed=5)
    assert breakdown.all()
    torch.testing.assert_close(V.T @ V, torch.eye(10, dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close(M @ V[:, :8], V @ H[:, :8], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_products_raise(bad):
    M = random_indefinite(20, seed=6)
    M[2, 7] = M[7, 2] = bad
    A = TensorLinearOperator(M, symmetric=True)
    V0 = torch.randn(20, 2, generator=generator(7), dtype=DTYPE)
    with pytest.raises(FloatingPointError, match="contains NaN or Inf entries"):
        lanczos_tridiagonalization(A, V0, 5, generator(8))
    with pytest.raises(FloatingPointError, match="contains NaN or Inf entries"):
        lanczos_approximate_spectrum(A, ncv=5, generator=generator(9))
