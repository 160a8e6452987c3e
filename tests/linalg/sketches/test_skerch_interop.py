"""curvops operators plug into skerch's sketched algorithms unchanged (if skerch is installed)."""

import pytest
import torch
from helpers.linalg_problems import DTYPE, matrix_with_spectrum

from curvops.linalg import CGInverseLinearOperator
from curvops.structured import TensorLinearOperator

skerch_algorithms = pytest.importorskip("skerch.algorithms")


def _low_rank_operator():
    lam = torch.zeros(60, dtype=DTYPE)
    lam[:5] = torch.tensor([5.0, 4.0, -3.0, 2.0, 1.0], dtype=DTYPE)
    M = matrix_with_spectrum(lam, seed=0)
    shapes = [(6, 10)]
    return M, TensorLinearOperator(M, shapes, shapes)


def test_skerch_seigh_on_lazy_operator_algebra():
    M, A = _low_rank_operator()
    op = 2.0 * A - A  # a lazy sum: skerch only sees A.shape and A @ block
    eigenvalues, eigenvectors = skerch_algorithms.seigh(op, op.device, op.dtype, 10)
    approx = (eigenvectors * eigenvalues) @ eigenvectors.T
    torch.testing.assert_close(approx, M, rtol=1e-8, atol=1e-8)


def test_skerch_xdiag_on_curvops_operator():
    M, A = _low_rank_operator()
    result = skerch_algorithms.xhutchpp(A, A.device, A.dtype, x_dims=10)
    torch.testing.assert_close(result["tr"], torch.trace(M), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(result["diag"], torch.diagonal(M), rtol=1e-8, atol=1e-8)


def test_skerch_seigh_on_cg_inverse():
    lam = torch.linspace(1.0, 2.0, 40, dtype=DTYPE)
    lam[-3:] = torch.tensor([0.01, 0.02, 0.05], dtype=DTYPE)  # dominate the inverse
    M = matrix_with_spectrum(lam, seed=1)
    inverse = CGInverseLinearOperator(M, tolerance=1e-12)
    eigenvalues, _ = skerch_algorithms.seigh(inverse, inverse.device, inverse.dtype, 12)
    top = eigenvalues.abs().sort(descending=True).values[:3]
    torch.testing.assert_close(
        top, torch.tensor([100.0, 50.0, 20.0], dtype=DTYPE), rtol=2e-2, atol=0
    )


def test_skerch_seigh_on_ggn_of_a_net():
    """The paper's snippet: a sketched eigendecomposition of a curvature operator."""
    from cases import make_case

    from curvops import GGNLinearOperator
    from curvops.testing import dense_ggn

    case = make_case("mlp-mse-sum")  # D = 45, rank(GGN) <= N * outputs = 36
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, case.data)
    eigenvalues, eigenvectors = skerch_algorithms.seigh(G, G.device, G.dtype, 40)
    approx = (eigenvectors * eigenvalues) @ eigenvectors.T
    exact = dense_ggn(case.model_func, case.loss_func, case.params, case.data)
    torch.testing.assert_close(approx, exact, rtol=1e-7, atol=1e-8)
