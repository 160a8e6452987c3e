r"""Accuracy of randomized trace and diagonal estimators against their budget (paper Fig. 4).

For a matrix with known trace :math:`t` and diagonal :math:`a`, every estimator runs
``runs`` times per budget of matrix-vector products; errors are

* trace: :math:`|\hat t - t| / |t|`,
* diagonal: :math:`\max_i |a_i - \hat a_i| / \max_j |a_j|`,

as in Dangel et al. (2025), Fig. 4 (bottom). Test matrices with a power-law spectrum,
:math:`A = Q \operatorname{diag}(1^{-p}, 2^{-p}, \dots, D^{-p}) Q^\top` with :math:`Q` from the
QR decomposition of a Gaussian matrix, follow the same figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from curvops.linalg import hutchinson_diag, hutchinson_trace, hutchpp_trace, xdiag, xtrace
from curvops.linear_operator import LinearOperator
from curvops.structured import TensorLinearOperator

TRACE_ESTIMATORS: dict[str, Callable] = {
    "Hutchinson": hutchinson_trace,
    "Hutch++": hutchpp_trace,
    "XTrace": xtrace,
}
DIAGONAL_ESTIMATORS: dict[str, Callable] = {"Hutchinson": hutchinson_diag, "XDiag": xdiag}


def power_law_matrix(
    dim: int,
    exponent: float,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A random symmetric matrix whose eigenvalues are :math:`i^{-p}`, :math:`i = 1..D`.

    Args:
        dim: Dimension :math:`D`.
        exponent: Decay :math:`p \\geq 0` (larger: faster decay).
        generator: Generator of the random eigenbasis.
        dtype: Data type.
        device: Device.

    Returns:
        The dense ``[D, D]`` matrix.
    """
    G = torch.randn(dim, dim, generator=generator, dtype=dtype).to(device)
    Q, _ = torch.linalg.qr(G)
    eigenvalues = torch.arange(1, dim + 1, dtype=dtype, device=device) ** (-exponent)
    return (Q * eigenvalues) @ Q.T


def _error_table(
    estimators: dict[str, Callable],
    A: LinearOperator | Tensor,
    error: Callable[[Tensor], float],
    budgets: Sequence[int],
    runs: int,
    generator: torch.Generator,
    progressbar: bool,
    on_step: Callable[[str], None] | None,
) -> dict[str, tuple[list[int], np.ndarray]]:
    """Errors of every estimator for every budget and run (estimators, then budgets, then runs).

    A dense tensor is wrapped into a :class:`~curvops.structured.TensorLinearOperator` once
    (its symmetry check costs more than a small estimate, and would otherwise run in every
    call).

    Args:
        estimators: Name -> estimator called as ``estimator(A, budget, generator=generator)``.
        A: The matrix (operator or dense tensor).
        error: Maps an estimate to its error.
        budgets: Numbers of matrix-vector products.
        runs: Independent runs per budget.
        generator: Generator of every test vector.
        progressbar: Show a progress bar over the budgets.
        on_step: Called with the estimator's name after all its runs.

    Returns:
        Estimator name -> ``(budgets, errors [len(budgets), runs])``.
    """
    if isinstance(A, Tensor):
        A = TensorLinearOperator(A)
    out = {}
    for name, estimator in estimators.items():
        errors = np.zeros((len(budgets), runs))
        for i, m in enumerate(tqdm(budgets, desc=name, disable=not progressbar, leave=False)):
            for r in range(runs):
                errors[i, r] = error(estimator(A, m, generator=generator))
        out[name] = (list(budgets), errors)
        if on_step is not None:
            on_step(name)
    return out


def trace_errors(
    A: LinearOperator | Tensor,
    exact_trace: float,
    budgets: Sequence[int],
    runs: int,
    *,
    generator: torch.Generator,
    progressbar: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, tuple[list[int], np.ndarray]]:
    """Relative errors of the trace estimators.

    Args:
        A: The matrix (operator or dense tensor).
        exact_trace: Its exact trace.
        budgets: Numbers of matrix-vector products (multiples of 6 suit every estimator).
        runs: Independent runs per budget.
        generator: Generator of every test vector.
        progressbar: Show a progress bar over the budgets.
        on_step: Called with each estimator's name after all its runs (e.g. to drive an
            outer progress bar).

    Returns:
        Estimator name -> ``(budgets, errors [len(budgets), runs])``.
    """

    def error(estimate: Tensor) -> float:
        return abs(float(estimate) - exact_trace) / abs(exact_trace)

    return _error_table(TRACE_ESTIMATORS, A, error, budgets, runs, generator, progressbar, on_step)


def diagonal_errors(
    A: LinearOperator | Tensor,
    exact_diagonal: Tensor,
    budgets: Sequence[int],
    runs: int,
    *,
    generator: torch.Generator,
    progressbar: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, tuple[list[int], np.ndarray]]:
    """Relative max-norm errors of the diagonal estimators.

    Args:
        A: The matrix (operator or dense tensor).
        exact_diagonal: Its exact diagonal.
        budgets: Numbers of matrix-vector products (even numbers of at least 4).
        runs: Independent runs per budget.
        generator: Generator of every test vector.
        progressbar: Show a progress bar over the budgets.
        on_step: Called with each estimator's name after all its runs (e.g. to drive an
            outer progress bar).

    Returns:
        Estimator name -> ``(budgets, errors [len(budgets), runs])``.
    """
    scale = float(exact_diagonal.abs().max())

    def error(estimate: Tensor) -> float:
        return float((estimate - exact_diagonal).abs().max()) / scale

    return _error_table(
        DIAGONAL_ESTIMATORS, A, error, budgets, runs, generator, progressbar, on_step
    )
