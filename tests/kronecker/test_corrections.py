"""EKFAC's correction sums: the T == 1 product and the chunked T > 1 form are the plain
per-datum squares (NOTE [squared per-datum gradients])."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.kronecker_problems import DTYPE, build, generator
from torch import nn

from curvops.kronecker import corrections
from curvops.kronecker.corrections import CorrectionAccumulator, squared_gradient_sum
from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.layers import LinearLayer

K, N, D_OUT, D_IN = 3, 7, 4, 5


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=generator(seed), dtype=DTYPE))[0]


def per_datum_reference(g, x, QB, QA, bias_column):
    """sum_{k,n} (QB^T G_kn QA)^2 with every per-datum gradient G_kn materialised."""
    if bias_column:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    per_datum = torch.einsum("knto,nti->knoi", g, x)
    return (QB.T @ per_datum @ QA).square().sum(dim=(0, 1))


class CountingBmm:
    """Wraps torch.bmm, counting calls and recording the largest result."""

    def __init__(self):
        self.calls, self.largest, self._bmm = 0, 0, torch.bmm

    def __call__(self, a, b):
        out = self._bmm(a, b)
        self.calls += 1
        self.largest = max(self.largest, out.numel())
        return out


# (K, T, d_out), covering the paths of squared_gradient_sum (d_in = 5 or 6 with the bias):
# T == 1; T <= d_in rotates g first, T <= K d_out rotates x first
SHAPES = {
    "no-positions": (3, 1, 4),
    "rotate-both-first": (3, 4, 4),
    "rotate-g-after": (3, 8, 4),
    "rotate-x-after": (1, 4, 2),
    "rotate-both-after": (2, 13, 4),
}
# budget (from K and the entries of one matrix) -> (k_chunk, n_chunk) for N = 7
CHUNKINGS = {
    "default": (None, lambda k: (k, N)),
    "n-chunks": (lambda k, m: 2 * k * m, lambda k: (k, 2)),  # N = 2 + 2 + 2 + 1
    "k-chunks": (lambda k, m: 2 * m, lambda k: (min(k, 2), 2 // min(k, 2))),  # K = 3 = 2 + 1
    "below-one-matrix": (lambda k, m: 1, lambda k: (1, 1)),  # still one matrix at a time
}


@pytest.mark.parametrize("bias_column", [False, True], ids=["no-bias", "bias-column"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_squared_gradient_sum_matches_per_datum_squares(shape, chunking, bias_column, monkeypatch):
    K_, T, d_out = SHAPES[shape]
    d_in = D_IN + bias_column
    budget, chunks = CHUNKINGS[chunking]
    if budget is not None:
        monkeypatch.setattr(corrections, "CHUNK_ELEMENTS", budget(K_, d_out * d_in))
    counter = CountingBmm()
    monkeypatch.setattr(torch, "bmm", counter)
    gen = generator(0)
    g = torch.randn(K_, N, T, d_out, generator=gen, dtype=DTYPE)
    x = torch.randn(N, T, D_IN, generator=gen, dtype=DTYPE)
    QB, QA = random_orthogonal(d_out, 1), random_orthogonal(d_in, 2)
    result = squared_gradient_sum(g, x, QB, QA, bias_column=bias_column)
    expected = per_datum_reference(g, x, QB, QA, bias_column)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    if T == 1:
        assert counter.calls == 0  # one plain matrix product, no per-datum matrices
    else:
        k_chunk, n_chunk = chunks(K_)
        assert counter.calls == math.ceil(K_ / k_chunk) * math.ceil(N / n_chunk)
        assert counter.largest <= k_chunk * n_chunk * d_out * d_in


@pytest.mark.parametrize("chunked", [False, True], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("T", [None, 4], ids=["no-positions", "positions"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_accumulator_matches_per_datum_gradients(separate, T, chunked, monkeypatch):
    """Two batches of a linear layer with K = 3 gradient columns: the accumulated sums are
    sum_B w_B sum_{k,n} (Q_B^T G_kn Q_A)^2 with per-datum gradients built independently."""
    if chunked:
        monkeypatch.setattr(corrections, "CHUNK_ELEMENTS", 2 * D_OUT * (D_IN + 1))
    module = build(lambda: nn.Linear(D_IN, D_OUT))
    layer = LinearLayer("lin", module, 0, 1)
    n_in = D_IN if separate else D_IN + 1
    QA, QB = random_orthogonal(n_in, 1), random_orthogonal(D_OUT, 2)
    factors = LayerFactors(
        module_name="lin",
        module_type="Linear",
        weight_name="lin.weight",
        bias_name="lin.bias",
        joint=not separate,
        input_factor=torch.eye(n_in, dtype=DTYPE),
        gradient_factor=torch.eye(D_OUT, dtype=DTYPE),
        bias_input_factor=torch.ones((), dtype=DTYPE) if separate else None,
    )
    acc = CorrectionAccumulator(layer, factors, QA, QB)
    expected_w = torch.zeros(D_OUT, n_in, dtype=DTYPE)
    expected_b = torch.zeros(D_OUT, dtype=DTYPE)
    gen = generator(3)
    for weight, n in [(0.7, N), (1.3, 2)]:
        positions = () if T is None else (T,)
        x = torch.randn(n, *positions, D_IN, generator=gen, dtype=DTYPE)
        grad = torch.randn(K, n, *positions, D_OUT, generator=gen, dtype=DTYPE)
        acc.add((x,), grad, weight)
        rows_x = x.reshape(n, -1, D_IN)
        rows_g = grad.reshape(K, n, -1, D_OUT)
        for k in range(K):
            for i in range(n):
                G_w = rows_g[k, i].T @ rows_x[i]  # per-datum weight gradient
                G_b = rows_g[k, i].sum(dim=0)  # per-datum bias gradient
                if separate:
                    expected_w += weight * (QB.T @ G_w @ QA).square()
                    expected_b += weight * (QB.T @ G_b).square()
                else:
                    G = torch.cat([G_w, G_b.unsqueeze(1)], dim=1)
                    expected_w += weight * (QB.T @ G @ QA).square()
    torch.testing.assert_close(acc.weight_sum, expected_w, rtol=1e-12, atol=1e-12)
    if separate:
        torch.testing.assert_close(acc.bias_sum, expected_b, rtol=1e-12, atol=1e-12)
    else:
        assert acc.bias_sum is None
