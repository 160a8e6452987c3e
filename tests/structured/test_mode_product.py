"""Tests of the private helper ``curvops.structured._mode_product``."""

import torch

from curvops.structured._mode_product import mode_products


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mode_products_match_index_notation():
    A, B, C = _rand(4, 2, seed=1), _rand(3, 3, seed=2), _rand(1, 5, seed=3)
    X = _rand(2, 3, 5, 6, seed=4)
    expected = torch.einsum("ai,bj,ck,ijkn->abcn", A, B, C, X)
    torch.testing.assert_close(mode_products(X, [A, B, C]), expected)


def test_mode_products_on_large_kronecker_without_dense_matrix():
    """(A ⊗ B) vec_r(X) = vec_r(A X Bᵀ) for sizes whose dense Kronecker matrix (1.4e10
    entries) could not be stored."""
    A, B = _rand(300, 300, seed=5), _rand(400, 400, seed=6)
    X = _rand(300, 400, 2, seed=7)
    expected = torch.stack([A @ X[..., k] @ B.T for k in range(2)], dim=-1)
    torch.testing.assert_close(mode_products(X, [A, B]), expected)
