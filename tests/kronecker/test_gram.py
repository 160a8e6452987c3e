"""Upper-triangular Gram sums of rows in row-major and feature-major layouts."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, generator

from curvops.kronecker.gram import PANEL, add_gram_upper_, mirror_upper_


def _dense_gram(rows: torch.Tensor) -> torch.Tensor:
    Z = rows.reshape(-1, rows.shape[-1])
    return torch.einsum("ri,rj->ij", Z, Z)


def _layouts(d: int) -> dict[str, torch.Tensor]:
    g = generator(0)
    return {
        "row-major": torch.randn(3, 4, d, generator=g, dtype=DTYPE),
        "feature-major": torch.randn(d, 3 * 4, generator=g, dtype=DTYPE)
        .reshape(d, 3, 4)
        .permute(1, 2, 0),
        "permuted (copied)": torch.randn(2, d, 3, 4, generator=g, dtype=DTYPE).permute(0, 2, 3, 1),
        "strided rows": torch.randn(4, 2 * d, generator=g, dtype=DTYPE)[:, ::2],
    }


# one product, two and three panels (a ragged last one), wide panels
SIZES = [5, 2 * PANEL + 1, 3 * PANEL - 7, 9 * PANEL]


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("layout", list(_layouts(1)))
def test_gram_sums_match_dense(layout, d):
    rows = _layouts(d)[layout]
    start = torch.randn(d, d, generator=generator(1), dtype=DTYPE)
    start = start + start.T
    acc = start.clone()
    assert add_gram_upper_(acc, rows, alpha=0.5) is acc
    add_gram_upper_(acc, rows[:1])  # a second batch
    expected = start + 0.5 * _dense_gram(rows) + _dense_gram(rows[:1])
    torch.testing.assert_close(acc.triu(), expected.triu())
    assert mirror_upper_(acc) is acc
    torch.testing.assert_close(acc, expected)


def test_single_feature_and_no_rows():
    acc = torch.zeros(1, 1, dtype=DTYPE)
    rows = torch.randn(6, 1, generator=generator(2), dtype=DTYPE)
    add_gram_upper_(acc, rows)
    torch.testing.assert_close(acc, rows.T @ rows)
    ones = torch.ones(3, 3, dtype=DTYPE)
    add_gram_upper_(ones, torch.zeros(0, 3, dtype=DTYPE))
    torch.testing.assert_close(ones, torch.ones(3, 3, dtype=DTYPE))


@pytest.mark.parametrize("budget", [2**22, 3 * 7 * 7])  # one chunk; chunks of 3 with a remainder
def test_per_datum_blocks_use_batched_products(budget, monkeypatch):
    """NOTE [Gram sums of per-datum blocks]: rows ``[K, N, P, d]`` stored ``[K, N, d, P]``."""
    import curvops.kronecker.gram as gram

    monkeypatch.setattr(gram, "BLOCK_CHUNK_ELEMENTS", budget)
    calls = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[0]) or original(a, b))
    d, P = 7, 9
    stored = torch.randn(2, 5, d, P, generator=generator(4), dtype=DTYPE)
    rows = stored.transpose(-1, -2)  # [K, N, P, d]
    acc = torch.zeros(d, d, dtype=DTYPE)
    add_gram_upper_(acc, rows, alpha=0.5)
    mirror_upper_(acc)
    torch.testing.assert_close(acc, 0.5 * _dense_gram(rows))
    assert calls == ([10] if budget == 2**22 else [3, 3, 3, 1])


def test_few_positions_per_block_are_copied_once():
    """With fewer positions than features, one product of the copied rows is cheaper."""
    d, P = 7, 3
    rows = torch.randn(2, 5, d, P, generator=generator(5), dtype=DTYPE).transpose(-1, -2)
    acc = torch.zeros(d, d, dtype=DTYPE)
    mirror_upper_(add_gram_upper_(acc, rows))
    torch.testing.assert_close(acc, _dense_gram(rows))
