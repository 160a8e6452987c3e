"""Adaptive stopping loops of the estimators (private).

Both loops draw test vectors in rounds until the relative error
:math:`\\max_j \\text{err}_j / \\max_j |\\hat{a}_j|` (for a trace: :math:`\\text{err} /
|\\hat{t}|`) is at most the target or the budget of products is spent. Without a target they
run exactly one round. ``error`` is the Student-t widened error of NOTE [estimator error
bars] in :mod:`curvops.linalg.estimators._error_bars`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from curvops.linalg.estimators._checks import relative
from curvops.linalg.estimators._error_bars import student_t_factor
from curvops.linalg.estimators._exchangeable_sketch import LeaveOneOutSketch
from curvops.linalg.estimators._setup import EstimatorSetup
from curvops.linalg.estimators.result import EstimateWithError, finish


def _accurate_enough(error: Tensor, estimate: Tensor, target: float) -> bool:
    """Whether the largest error relative to the largest absolute estimate is at most ``target``."""
    return relative(error.max(), estimate.abs().max()) <= target


class SampleStatistics(Protocol):
    """Accumulated samples of an estimator.

    A :class:`~curvops.linalg.estimators._moments.RunningMoments` or a
    :class:`~curvops.linalg.estimators._error_bars.QuadraticFormSamples`.
    """

    @property
    def mean(self) -> Tensor:
        """The estimate."""

    def error(self) -> Tensor:
        """Its error (NOTE [estimator error bars])."""


@dataclass
class Rounds:
    """The outcome of an adaptive loop.

    Attributes:
        estimate: The estimate.
        error: Its error, or ``None`` if neither asked for nor needed.
        num_matvecs: Products spent.
        stopped_at_dimension: Whether a sketch stopped growing at the dimension.
    """

    estimate: Tensor
    error: Tensor | None
    num_matvecs: int
    stopped_at_dimension: bool = False

    def result(self, setup: EstimatorSetup, return_error: bool) -> Tensor | EstimateWithError:
        """What the estimator returns (warns if the target was missed; see :func:`finish`)."""
        return finish(
            self.estimate,
            self.error,
            method=setup.method,
            num_matvecs=self.num_matvecs,
            target_rel_error=setup.target,
            budget=setup.budget,
            return_error=return_error,
            stopped_at_dimension=self.stopped_at_dimension,
            stacklevel=3,  # finish <- Rounds.result <- estimator <- caller
        )


def sample_in_rounds(
    setup: EstimatorSetup,
    statistics: SampleStatistics,
    add_samples: Callable[[SampleStatistics, Tensor], None],
    *,
    return_error: bool,
    products_per_sample: int = 1,
) -> Rounds:
    """Average independent samples, ``num_matvecs`` products (one block product) a round.

    Args:
        setup: Checked inputs of the estimator.
        statistics: Accumulator of the samples.
        add_samples: Adds the samples of test vectors ``V`` ``[D, n]`` to ``statistics``
            (computing the products).
        return_error: Whether the caller returns the error.
        products_per_sample: Products spent per test vector.

    Returns:
        Estimate, error (if asked for or adaptive) and products spent.
    """
    used, pps = 0, products_per_sample
    while True:
        batch = min(setup.num_matvecs, setup.budget - used) // pps
        add_samples(statistics, setup.draw(batch))
        used += batch * pps
        if setup.target is None or used + pps > setup.budget:
            break
        if _accurate_enough(statistics.error(), statistics.mean, setup.target):
            break
    needs_error = return_error or setup.target is not None
    return Rounds(statistics.mean, statistics.error() if needs_error else None, used)


def grow_exchangeable_sketch(
    setup: EstimatorSetup,
    samples_of: Callable[[LeaveOneOutSketch], tuple[Tensor, Tensor | None]],
    *,
    transpose_products: bool,
) -> Rounds:
    """Grow a leave-one-out sketch by ``num_matvecs / 2`` test vectors a round (XTrace, XDiag).

    The samples of one sketch are exchangeable, not independent, so each round recomputes
    all of them from the grown sketch (NOTE [leave-one-out sketch] in
    :mod:`curvops.linalg.estimators._exchangeable_sketch`). The sketch stops growing at the
    dimension :math:`D`.

    Args:
        setup: Checked inputs of the estimator.
        samples_of: Maps the sketch to its :math:`m` leave-one-out samples along the last
            axis, and optionally a second estimate of the variance of their mean (XTrace's
            variance formula), or ``None``.
        transpose_products: Whether the sketch's second block product is with :math:`A^\\top`.

    Returns:
        The mean of the samples, its error (the sample standard deviation over
        :math:`\\sqrt{m}`, or the square root of the second variance estimate if larger,
        widened by the Student-t factor with :math:`m - 1` degrees of freedom) and the
        products spent.
    """
    D, budget = setup.dim, setup.budget
    step = setup.num_matvecs // 2
    sketch = LeaveOneOutSketch(setup.A, transpose_products=transpose_products)
    while True:
        new = min(step, (budget - sketch.num_matvecs) // 2, D - sketch.size)
        sketch.grow(setup.draw(new))
        samples, variance = samples_of(sketch)
        m = sketch.size
        estimate = samples.mean(dim=-1)
        standard_error = samples.std(dim=-1) / m**0.5
        if variance is not None:
            standard_error = torch.maximum(standard_error, variance.sqrt())
        error = student_t_factor(m - 1) * standard_error
        can_grow = sketch.num_matvecs + 2 <= budget and sketch.size < D
        if setup.target is None or not can_grow:
            break
        if _accurate_enough(error, estimate, setup.target):
            break
    at_dimension = sketch.size >= D and sketch.num_matvecs + 2 <= budget
    return Rounds(estimate, error, sketch.num_matvecs, at_dimension)
