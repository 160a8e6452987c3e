"""Adaptive stopping loops of the trace and diagonal estimators (private).

Both loops draw test vectors in rounds until the relative error estimate
:math:`\\max_j \\text{err}_j / \\max_j |\\hat{a}_j|` (for a trace: :math:`\\text{err} /
|\\hat{t}|`) is at most the target or the budget of products is spent. Without a target they
run exactly one round.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from curvops.linalg.estimators._checks import relative
from curvops.linalg.estimators._exchangeable_sketch import LeaveOneOutSketch
from curvops.linalg.estimators._moments import RunningMoments
from curvops.linalg.estimators._setup import EstimatorSetup


def _accurate_enough(error: Tensor, estimate: Tensor, target: float) -> bool:
    """Whether the largest error relative to the largest absolute estimate is at most ``target``."""
    return relative(error.max(), estimate.abs().max()) <= target


def sample_in_rounds(
    setup: EstimatorSetup, samples_of: Callable[[Tensor, Tensor], Tensor]
) -> RunningMoments:
    """Average independent samples, ``num_matvecs`` test vectors (one block product) a round.

    Args:
        setup: Checked inputs of the estimator.
        samples_of: Maps test vectors ``V`` ``[D, n]`` and ``A @ V`` to ``n`` samples along
            the last axis (e.g. :math:`v_i^\\top A v_i` for Hutchinson's trace estimator).

    Returns:
        Mean and standard error of all samples drawn.
    """
    moments = RunningMoments()
    used = 0
    while True:
        batch = min(setup.num_matvecs, setup.budget - used)
        V = setup.draw(batch)
        moments.update(samples_of(V, setup.A @ V))
        used += batch
        if setup.target is None or used >= setup.budget:
            break
        if _accurate_enough(moments.standard_error(), moments.mean, setup.target):
            break
    return moments


def grow_exchangeable_sketch(
    setup: EstimatorSetup,
    samples_of: Callable[[LeaveOneOutSketch], Tensor],
    *,
    transpose_products: bool,
) -> tuple[Tensor, Tensor]:
    """Grow a leave-one-out sketch by ``num_matvecs / 2`` test vectors a round (XTrace, XDiag).

    The samples of one sketch are exchangeable, not independent, so each round recomputes
    all of them from the grown sketch (NOTE [leave-one-out sketch] in
    :mod:`curvops.linalg.estimators._exchangeable_sketch`). The sketch stops growing at the
    dimension :math:`D`.

    Args:
        setup: Checked inputs of the estimator.
        samples_of: Maps the sketch to its :math:`m` leave-one-out samples along the last
            axis.
        transpose_products: Whether the sketch's second block product is with :math:`A^\\top`.

    Returns:
        The mean of the samples and its error estimate, the sample standard deviation
        divided by :math:`\\sqrt{m}`.
    """
    D, budget = setup.dim, setup.budget
    step = setup.num_matvecs // 2
    sketch = LeaveOneOutSketch(setup.A, transpose_products=transpose_products)
    while True:
        new = min(step, (budget - sketch.num_matvecs) // 2, D - sketch.size)
        sketch.grow(setup.draw(new))
        samples = samples_of(sketch)
        estimate = samples.mean(dim=-1)
        error = samples.std(dim=-1) / sketch.size**0.5
        can_grow = sketch.num_matvecs + 2 <= budget and sketch.size < D
        if setup.target is None or not can_grow:
            break
        if _accurate_enough(error, estimate, setup.target):
            break
    return estimate, error
