"""The measured operations, each as a set-up function returning the closure to time.

A task's set-up (building operators, computing the factors a product needs, one warm-up
call where something is built lazily) is not timed; the returned closure is. Every task has a
``curvops`` implementation and, where the library offers the same thing, a ``curvlinops``
(3.0.1) one with the same problem, data, parameters and options. KFAC tasks use the
parameters of the ``nn.Linear``/``nn.Conv2d`` layers in both libraries.

Task definitions (what the closure does):

* ``gradient``: the reference, ``torch.autograd.grad`` of each batch's loss (scaled by
  ``N_B / N``) with respect to all parameters, i.e. the cost of ``loss.backward()``.
* ``*_mvp``: one product ``A @ v`` with a flat vector ``v``.
* ``ggn_mm32``: ``G @ V`` with ``V`` of shape ``[D, 32]``.
* ``kfac_<type>``: a fresh KFAC operator computing its Kronecker factors (one data pass).
* ``kfac_mvp`` / ``kfac_inv_mvp``: one product with KFAC (type ``"mc"``) / its inverse
  (damping ``1e-3``), factors and factorisation already computed.
* ``kfac_inv_build``: the inverse's factorisation (Cholesky factorisations of the damped
  factors in curvops; curvlinops' own, cached) plus its first product.
* ``ekfac_correction``: EKFAC's eigenvalue correction (eigendecompositions of the factors and
  the correction pass over the data), with the KFAC factors already computed.
* ``ggn_diag``, ``ef_diag``, ``mc_diag``: the exact diagonal ``A.diagonal()`` of the GGN,
  empirical and Monte-Carlo Fisher (curvlinops 3.0.1 has no exact diagonal).
* ``ggn_dense``: ``G.to_dense()`` (the identity's ``D`` columns through the chunked products,
  or the Gram matrix of per-datum gradients where cheaper), only on problems with at most
  :data:`DENSE_MAX_PARAMS` parameters: the reference for the diagonal's cost.
* ``sleep``: sleeps :data:`SLEEP_SECONDS` per call, run only on request: a task that
  outlasts ``--task-timeout``, to check (in tests, or by hand) that the suite records it as
  a timeout and goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.problems import Problem

DAMPING = 1e-3
NUM_COLUMNS = 32
DENSE_MAX_PARAMS = 20_000
SLEEP_SECONDS = 30.0


@dataclass(frozen=True)
class Task:
    """A measured operation and its targets (multiples of one gradient / of curvlinops).

    Attributes:
        name: Key.
        label: Row label of the results table.
        time_target: Maximum run time in gradients (``None``: no target).
        memory_target: Maximum peak memory in gradients (``None``: no target).
        curvlinops_target: Maximum run time relative to curvlinops 3.0.1.
        max_params: Run only on problems with at most this many parameters (``None``: all).
        in_default_run: Whether a run without ``--tasks`` includes it.
    """

    name: str
    label: str
    time_target: float | None = None
    memory_target: float | None = None
    curvlinops_target: float | None = 0.7
    max_params: int | None = None
    in_default_run: bool = True


TASKS: list[Task] = [
    Task("gradient", "gradient (reference)", curvlinops_target=None),
    Task("ggn_mvp", "GGN @ v", 1.6, 1.3),
    Task("ef_mvp", "EF @ v", 1.6),
    Task("mc_mvp", "MC-Fisher @ v", 1.6),
    Task("hessian_mvp", "Hessian @ v", 2.0, 2.0),
    Task("ggn_mm32", f"GGN @ V (V: D x {NUM_COLUMNS})", 40.0, curvlinops_target=0.6),
    Task("kfac_mc", 'KFAC factors "mc"', 1.5),
    Task("kfac_empirical", 'KFAC factors "empirical"', 1.5),
    Task("kfac_type-2", 'KFAC factors "type-2"', 4.0),
    Task("kfac_mvp", "KFAC @ v", 0.1),
    Task("kfac_inv_mvp", "KFAC^-1 @ v", 0.1),
    Task("ekfac_correction", "EKFAC eigenvalue correction", None),
    Task("kfac_inv_build", "KFAC inverse factorisation", None),
    # the exact diagonals: run on request (the GPT's GGN diagonal takes thousands of gradients)
    Task("ggn_diag", "GGN diagonal (exact)", curvlinops_target=None, in_default_run=False),
    Task("ef_diag", "EF diagonal (exact)", curvlinops_target=None, in_default_run=False),
    Task("mc_diag", "MC-Fisher diagonal (exact)", curvlinops_target=None, in_default_run=False),
    Task(
        "ggn_dense",
        "GGN to_dense()",
        curvlinops_target=None,
        max_params=DENSE_MAX_PARAMS,
        in_default_run=False,
    ),
    # not a measurement: sleeps SLEEP_SECONDS per call (tests and demonstrates --task-timeout)
    Task("sleep", "sleep (time-limit check)", curvlinops_target=None, in_default_run=False),
]
TASKS_BY_NAME = {t.name: t for t in TASKS}

IMPLEMENTATIONS = ("curvops", "curvlinops")


def kfac_available() -> bool:
    """Whether ``curvops.kronecker`` (KFAC, EKFAC and the inverse) can be imported."""
    try:
        import curvops.kronecker  # noqa: F401
    except ImportError:
        return False
    return True


def curvlinops_available() -> bool:
    """Whether the optional comparison library ``curvlinops`` (3.0.1) is installed."""
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        return False
    return True


def _vector(dim: int, problem: Problem, columns: int | None = None) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    shape = (dim,) if columns is None else (dim, columns)
    return torch.randn(shape, generator=gen).to(problem.params[0].device)


def _dim(params: list[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _gradient(problem: Problem) -> Callable[[], Any]:
    N = problem.num_data

    def run():
        grads = None
        for X, y in problem.data:
            loss = problem.loss_func(problem.model(X), y) * (X.shape[0] / N)
            g = torch.autograd.grad(loss, problem.params)
            grads = list(g) if grads is None else [a.add_(b) for a, b in zip(grads, g)]
        return grads

    return run


def _product(op, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: op @ x


# ==================================================================== curvops
def _curvops_exact(problem: Problem, cls_name: str, columns: int | None = None):
    import curvops

    cls = getattr(curvops, cls_name)
    op = cls(
        problem.model, problem.loss_func, problem.params, problem.data, check_deterministic=False
    )
    return _product(op, _vector(op.shape[1], problem, columns))


def _curvops_kfac(problem: Problem, fisher_type: str = "mc", cls_name: str = "KFACLinearOperator"):
    from curvops import kronecker

    return getattr(kronecker, cls_name)(
        problem.model,
        problem.loss_func,
        problem.kfac_params,
        problem.data,
        fisher_type=fisher_type,
        check_deterministic=False,
    )


def _curvops_setup(task: str, problem: Problem) -> Callable[[], Any]:
    exact = {
        "ggn_mvp": "GGNLinearOperator",
        "ef_mvp": "EFLinearOperator",
        "mc_mvp": "FisherMCLinearOperator",
        "hessian_mvp": "HessianLinearOperator",
    }
    if task == "gradient":
        return _gradient(problem)
    if task == "sleep":
        return lambda: time.sleep(SLEEP_SECONDS)
    if task in exact:
        return _curvops_exact(problem, exact[task])
    if task == "ggn_mm32":
        return _curvops_exact(problem, "GGNLinearOperator", NUM_COLUMNS)
    diagonals = {
        "ggn_diag": "GGNLinearOperator",
        "ef_diag": "EFLinearOperator",
        "mc_diag": "FisherMCLinearOperator",
    }
    if task in diagonals or task == "ggn_dense":
        import curvops

        cls = getattr(curvops, diagonals.get(task, "GGNLinearOperator"))
        args = (problem.model, problem.loss_func, problem.params, problem.data)
        op = cls(*args, check_deterministic=False)
        return op.to_dense if task == "ggn_dense" else op.diagonal
    from curvops.kronecker import (
        EKFACLinearOperator,
        KFACInverseLinearOperator,
        KFACLinearOperator,
    )

    if task.startswith("kfac_") and task[5:] in ("mc", "empirical", "type-2"):

        def build():
            K = _curvops_kfac(problem, task[5:])
            K.compute_factors()
            return K

        return build
    K = _curvops_kfac(problem)
    K.compute_factors()
    v = _vector(K.shape[1], problem)
    if task == "kfac_mvp":
        K @ v  # assemble the block operator once
        return _product(K, v)
    if task == "kfac_inv_mvp":
        return _product(KFACInverseLinearOperator(K, damping=DAMPING), v)
    if task == "kfac_inv_build":
        state = K.state_dict()

        def build_inverse():
            K.load_state_dict(state)  # drops the cached eigendecompositions
            return KFACInverseLinearOperator(K, damping=DAMPING) @ v

        return build_inverse
    if task == "ekfac_correction":
        EK = _curvops_kfac(problem, cls_name="EKFACLinearOperator")
        state = dict(K.state_dict(), type="EKFACLinearOperator")

        def correct():
            # KFAC's loader sets the factors and clears EKFAC's bases and corrections
            KFACLinearOperator.load_state_dict(EK, state)
            return EK.eigenvalue_corrections

        assert isinstance(EK, EKFACLinearOperator)
        return correct
    raise KeyError(f"Unknown task {task!r}.")


# ==================================================================== curvlinops
def _curvlinops_setup(task: str, problem: Problem) -> Callable[[], Any] | None:
    import curvlinops as cl

    args = (problem.model, problem.loss_func, problem.params, problem.data)
    exact = {
        "ggn_mvp": cl.GGNLinearOperator,
        "ef_mvp": cl.EFLinearOperator,
        "mc_mvp": cl.FisherMCLinearOperator,
        "hessian_mvp": cl.HessianLinearOperator,
    }
    if task in ("gradient", "sleep", "ggn_diag", "ef_diag", "mc_diag", "ggn_dense"):
        return None  # no exact diagonal in curvlinops 3.0.1; to_dense is not compared
    if task in exact or task == "ggn_mm32":
        op = exact.get(task, cl.GGNLinearOperator)(*args, check_deterministic=False)
        columns = NUM_COLUMNS if task == "ggn_mm32" else None
        return _product(op, _vector(op.shape[1], problem, columns))

    def kfac(fisher_type="mc", cls=cl.KFACLinearOperator):
        return cls(
            problem.model,
            problem.loss_func,
            problem.kfac_params,
            problem.data,
            fisher_type=fisher_type,
            check_deterministic=False,
        )

    if task.startswith("kfac_") and task[5:] in ("mc", "empirical", "type-2"):

        def build():
            K = kfac(task[5:])
            K.compute_kronecker_factors()
            return K

        return build
    K = kfac()
    K.compute_kronecker_factors()
    v = _vector(K.shape[1], problem)
    if task == "kfac_mvp":
        return _product(K, v)
    if task == "kfac_inv_mvp":
        inverse = cl.KFACInverseLinearOperator(K, damping=DAMPING)
        inverse @ v  # computes and caches the factorisation
        return _product(inverse, v)
    if task == "kfac_inv_build":
        return lambda: cl.KFACInverseLinearOperator(K, damping=DAMPING, cache=True) @ v
    if task == "ekfac_correction":
        EK = kfac(cls=cl.EKFACLinearOperator)
        EK.compute_kronecker_factors()

        def correct():
            EK._input_covariances_eigenvectors = {}  # recompute the bases, as curvops does
            EK._gradient_covariances_eigenvectors = {}
            EK.compute_eigenvalue_correction()

        return correct
    raise KeyError(f"Unknown task {task!r}.")


def setup(task: str, problem: Problem, implementation: str) -> Callable[[], Any] | None:
    """Build the closure that performs ``task`` with ``implementation``.

    Args:
        task: A task name (:data:`TASKS`).
        problem: The problem.
        implementation: ``"curvops"`` or ``"curvlinops"``.

    Returns:
        The closure, or ``None`` if the implementation has no such task.

    Raises:
        KeyError: For an unknown task or implementation.
    """
    if task not in TASKS_BY_NAME:
        raise KeyError(f"Unknown task {task!r}; known: {', '.join(TASKS_BY_NAME)}.")
    if implementation == "curvops":
        return _curvops_setup(task, problem)
    if implementation == "curvlinops":
        return _curvlinops_setup(task, problem)
    raise KeyError(f"Unknown implementation {implementation!r}; use one of {IMPLEMENTATIONS}.")


def needs_kfac(task: str) -> bool:
    """Whether the task uses the Kronecker family."""
    return task.startswith(("kfac", "ekfac"))
