"""XTrace/XDiag on exactly low-rank matrices (sketch larger than the rank).

A GGN with fewer data x outputs than parameters is exactly low-rank, so the leave-one-out
bases must not pick up the arbitrary extra directions of a rank-deficient sketch.
"""

import pytest
import torch

from curvops import xdiag, xtrace

LOW_RANK = torch.diag(torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def _random_low_rank(D=40, r=3, seed=0):
    B = torch.randn(D, r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return B @ B.T


def test_exact_for_gaussian_vectors_when_sketch_covers_range():
    # with Gaussian test vectors, any m-1 >= rank sketch columns span the range: exact
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert xtrace(LOW_RANK, 6, distribution="normal", generator=g).item() == pytest.approx(9)
        g = torch.Generator().manual_seed(seed)
        d = xdiag(LOW_RANK, 6, distribution="normal", generator=g)
        torch.testing.assert_close(d, torch.diagonal(LOW_RANK))
    A = _random_low_rank()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        torch.testing.assert_close(xtrace(A, 20, generator=g), torch.trace(A))
        g = torch.Generator().manual_seed(seed)
        torch.testing.assert_close(xdiag(A, 20, generator=g), torch.diagonal(A))


def test_unbiased_with_rademacher_vectors_on_low_rank():
    # Rademacher columns are often parallel on the range: some leave-one-out bases shrink
    runs = 1500
    traces = torch.stack(
        [xtrace(LOW_RANK, 6, generator=torch.Generator().manual_seed(s)) for s in range(runs)]
    )
    diags = torch.stack(
        [xdiag(LOW_RANK, 6, generator=torch.Generator().manual_seed(s)) for s in range(runs)]
    )
    stderr = traces.std() / runs**0.5
    assert abs(traces.mean() - 9.0) < 4 * stderr + 1e-12
    d_err = (diags.mean(0) - torch.diagonal(LOW_RANK)).abs()
    assert (d_err <= 4 * diags.std(0) / runs**0.5 + 1e-12).all()
    # entries outside the range are exactly zero (they were 0.2 before the fix)
    assert diags[:, 2:].abs().max() < 1e-12
