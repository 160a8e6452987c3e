"""In-place Gram sums of rows in row-major and feature-major layouts."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, generator

from curvops.kronecker.gram import add_gram_


def _dense_gram(rows: torch.Tensor) -> torch.Tensor:
    Z = rows.reshape(-1, rows.shape[-1])
    return torch.einsum("ri,rj->ij", Z, Z)


def _layouts() -> dict[str, torch.Tensor]:
    g = generator(0)
    return {
        "row-major": torch.randn(3, 4, 5, generator=g, dtype=DTYPE),
        "feature-major": torch.randn(5, 3 * 4, generator=g, dtype=DTYPE)
        .reshape(5, 3, 4)
        .permute(1, 2, 0),
        "permuted (copied)": torch.randn(2, 5, 3, 4, generator=g, dtype=DTYPE).permute(0, 2, 3, 1),
        "one feature": torch.randn(6, 1, generator=g, dtype=DTYPE),
        "strided rows": torch.randn(4, 10, generator=g, dtype=DTYPE)[:, ::2],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_add_gram_matches_dense(layout):
    rows = _layouts()[layout]
    d = rows.shape[-1]
    start = torch.randn(d, d, generator=generator(1), dtype=DTYPE)
    acc = start.clone()
    out = add_gram_(acc, rows, alpha=0.5)
    assert out is acc
    torch.testing.assert_close(acc, start + 0.5 * _dense_gram(rows))


def test_add_gram_of_no_rows_is_a_no_op():
    acc = torch.ones(3, 3, dtype=DTYPE)
    add_gram_(acc, torch.zeros(0, 3, dtype=DTYPE))
    torch.testing.assert_close(acc, torch.ones(3, 3, dtype=DTYPE))
