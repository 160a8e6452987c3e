import numpy as np
import pytest
import torch

from curvops.cli.estimator_accuracy import diagonal_errors, power_law_matrix, trace_errors


def test_power_law_matrix_spectrum():
    M = power_law_matrix(20, 2.0, generator=torch.Generator().manual_seed(0))
    expected = torch.arange(1, 21, dtype=torch.float64) ** -2.0
    torch.testing.assert_close(torch.linalg.eigvalsh(M).flip(0), expected)
    torch.testing.assert_close(M, M.T)


def test_error_curves_shapes_and_exact_limits():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(10, 3, generator=gen, dtype=torch.float64))
    M = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ Q.T  # rank 3
    trace = trace_errors(M, float(M.trace()), [6, 12], 3, generator=gen)
    assert set(trace) == {"Hutchinson", "Hutch++", "XTrace"}
    ms, errors = trace["Hutch++"]
    assert ms == [6, 12] and errors.shape == (2, 3)
    # with 12 products, the sketches of Hutch++ (4) and XTrace (6) capture the rank-3 range
    np.testing.assert_allclose(errors[1], 0.0, atol=1e-12)
    np.testing.assert_allclose(trace["XTrace"][1][1], 0.0, atol=1e-12)
    assert (trace["Hutchinson"][1] > 0).all()
    steps = []
    diag = diagonal_errors(M, M.diagonal(), [4, 8], 2, generator=gen, on_step=steps.append)
    assert steps == ["Hutchinson", "XDiag"]
    assert set(diag) == {"Hutchinson", "XDiag"} and diag["XDiag"][1].shape == (2, 2)
    assert (diag["Hutchinson"][1] > 0).all() and np.isfinite(diag["XDiag"][1]).all()


def test_error_curves_progressbar_option():
    gen = torch.Generator().manual_seed(0)
    M = torch.eye(6, dtype=torch.float64)
    out = trace_errors(M, 6.0, [6], 1, generator=gen, progressbar=True)
    assert out["Hutchinson"][1][0, 0] == pytest.approx(0.0)


def test_dense_matrix_is_checked_for_symmetry_once(monkeypatch):
    # the symmetry check of a dense matrix costs more than a small estimate: wrap it once
    from curvops.structured import _dense_linalg, tensor

    calls = []
    original = _dense_linalg.is_symmetric
    monkeypatch.setattr(tensor, "is_symmetric", lambda M: calls.append(1) or original(M))
    gen = torch.Generator().manual_seed(0)
    M = power_law_matrix(12, 1.0, generator=gen)
    trace_errors(M, float(M.trace()), [6, 12], 3, generator=gen)
    assert len(calls) == 1
