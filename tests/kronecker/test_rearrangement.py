"""The rearranged-block products of every layout against explicit per-datum gradient sums."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, generator
from helpers.nearest_kronecker import rearrange

from curvops.kronecker.rearrangement import (
    MatrixGradients,
    RowGradients,
    TokenGradients,
    choose_layout,
)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=generator(seed), dtype=DTYPE)


def _spd(d, seed):
    M = _randn(d, d, seed=seed)
    return M @ M.T + torch.eye(d, dtype=DTYPE)


def _dense_block(G: torch.Tensor, weight: float) -> torch.Tensor:
    """w sum_i vec_r(G_i) vec_r(G_i)^T for gradients G [I, m, n]."""
    flat = G.reshape(G.shape[0], -1)
    return weight * flat.T @ flat


@pytest.mark.parametrize("T", [1, 4])
def test_row_and_matrix_layouts_match_the_dense_rearrangement(T):
    K, N, m, n, w = 3, 5, 4, 6, 0.7
    X, g = _randn(N, T, n, seed=0), _randn(K, N, T, m, seed=1)
    G = torch.einsum("kntm,ntd->knmd", g, X).reshape(K * N, m, n)  # sum_t g_t x_t^T
    R = rearrange(_dense_block(G, w), m, n)
    A, B = _spd(n, seed=2), _spd(m, seed=3)
    expected_B = (R @ A.reshape(-1)).reshape(m, m)
    expected_A = (R.T @ B.reshape(-1)).reshape(n, n)
    expected_identity = (R @ (0.3 * torch.eye(n, dtype=DTYPE)).reshape(-1)).reshape(m, m)
    for st in (RowGradients.from_rows(X, g, w), MatrixGradients.from_rows(X, g, w)):
        torch.testing.assert_close(st.rearranged(A), expected_B)
        torch.testing.assert_close(st.rearranged_adjoint(B), expected_A)
        torch.testing.assert_close(st.rearranged_identity(0.3), expected_identity)
    assert RowGradients.from_rows(X, g, w).nbytes == (X.numel() + g.numel()) * 8
    assert MatrixGradients.from_rows(X, g, w).nbytes == K * N * m * n * 8


def test_tokens_match_the_dense_rearrangement_on_diagonal_inputs():
    """Repeated tokens within a datum are summed; padding tokens contribute nothing."""
    K, N, T, E, D, w, pad = 2, 4, 5, 6, 3, 1.5, 0
    ids = torch.randint(0, E, (N, T), generator=generator(4))
    ids[0, :2] = 3  # a repeated token
    ids[1, 0] = pad
    g = _randn(K, N, T, D, seed=5)
    # per-datum gradient of the weight [E, D]: sum over positions of one-hot(token) g^T
    onehot = torch.nn.functional.one_hot(ids, E).to(DTYPE)
    onehot[ids == pad] = 0
    G = torch.einsum("nte,kntd->kned", onehot, g).reshape(K * N, E, D)
    R = rearrange(_dense_block(G, w), E, D)  # first factor E x E
    st = TokenGradients.from_ids(ids, g, E, pad, w)
    a, B = torch.rand(E, generator=generator(6), dtype=DTYPE), _spd(D, seed=7)
    expected_B = (R.T @ torch.diag(a).reshape(-1)).reshape(D, D)
    expected_a = (R @ B.reshape(-1)).reshape(E, E).diagonal()
    torch.testing.assert_close(st.rearranged(a), expected_B)
    torch.testing.assert_close(st.rearranged_adjoint(B), expected_a)
    expected_identity = R.T @ torch.diag(torch.full((E,), 0.3, dtype=DTYPE)).reshape(-1)
    torch.testing.assert_close(st.rearranged_identity(0.3), expected_identity.reshape(D, D))
    assert (ids[0, :2] == 3).all() and st.grads.shape[1] < N * T  # pairs were merged


def test_layout_choice():
    assert choose_layout(K=10, T=1, m=100, n=100) == "rows"
    assert choose_layout(K=10, T=1024, m=16, n=27) == "matrices"  # a convolution
    assert choose_layout(K=9, T=3, m=4, n=3) == "rows"  # a short sequence
