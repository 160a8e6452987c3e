"""What the estimators return with ``return_error=True``, and the budget warning."""

from __future__ import annotations

import math
import warnings

from torch import Tensor

__all__ = ["BudgetExhaustedWarning", "EstimateWithError"]


class BudgetExhaustedWarning(UserWarning):
    """An adaptive estimator spent ``max_matvecs`` before reaching ``target_rel_error``.

    The estimate is still unbiased, but less accurate than asked for. The warning names the
    estimator, the products spent, the reached and the target relative error, and how to
    fix it; the returned :class:`EstimateWithError` has ``target_reached == False``.
    Turn it into an error with ``warnings.simplefilter("error", BudgetExhaustedWarning)``.
    """


class EstimateWithError(tuple):
    """``(estimate, error)`` of an estimator, with what it cost and whether it is accurate.

    A 2-tuple, so ``est, err = hutchinson_trace(A, return_error=True)`` works; the
    attributes say more. ``estimate ± 2 * error`` is an approximate 95% confidence interval
    (entrywise for diagonals; NOTE [estimator error bars] in
    :mod:`curvops.linalg.estimators._error_bars`).

    Attributes:
        estimate: The estimate (0-d tensor, or ``[D]`` for diagonals).
        error: Its error (same shape), a Student-t widened standard error.
        method: Name of the estimator.
        num_matvecs: Number of products spent.
        target_rel_error: The requested relative error, or ``None`` (no adaptive stopping).
        target_reached: Whether :attr:`relative_error` is at most ``target_rel_error``
            (``True`` without a target).
    """

    estimate: Tensor
    error: Tensor
    method: str
    num_matvecs: int
    target_rel_error: float | None
    target_reached: bool

    def __new__(
        cls,
        estimate: Tensor,
        error: Tensor,
        *,
        method: str,
        num_matvecs: int,
        target_rel_error: float | None = None,
    ) -> EstimateWithError:
        """Bundle an estimate with its error.

        Args:
            estimate: The estimate.
            error: Its error.
            method: Name of the estimator.
            num_matvecs: Number of products spent.
            target_rel_error: The requested relative error, or ``None``.

        Returns:
            The bundle.
        """
        self = super().__new__(cls, (estimate, error))
        self.estimate, self.error, self.method = estimate, error, method
        self.num_matvecs, self.target_rel_error = num_matvecs, target_rel_error
        self.target_reached = target_rel_error is None or self.relative_error <= target_rel_error
        return self

    @property
    def relative_error(self) -> float:
        """The relative error that ``target_rel_error`` bounds.

        :math:`\\max_j \\text{err}_j / \\max_j |\\hat{a}_j|` (for a trace:
        :math:`\\text{err} / |\\hat{t}|`; ``inf`` for a zero estimate with a nonzero error).
        """
        scale = float(self.estimate.abs().max())
        error = float(self.error.max())
        return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)

    def __reduce__(self):
        """Pickle with the attributes (a tuple subclass with keyword-only arguments)."""
        return (_rebuild, (tuple(self), self.method, self.num_matvecs, self.target_rel_error))

    def __repr__(self) -> str:
        """Show the pair and the bookkeeping."""
        return (
            f"EstimateWithError(estimate={self.estimate!r}, error={self.error!r}, "
            f"method={self.method!r}, num_matvecs={self.num_matvecs}, "
            f"target_rel_error={self.target_rel_error!r}, "
            f"target_reached={self.target_reached})"
        )


def _rebuild(pair, method, num_matvecs, target_rel_error) -> EstimateWithError:
    """Unpickle an :class:`EstimateWithError`."""
    return EstimateWithError(
        *pair, method=method, num_matvecs=num_matvecs, target_rel_error=target_rel_error
    )


def finish(
    estimate: Tensor,
    error: Tensor | None,
    *,
    method: str,
    num_matvecs: int,
    target_rel_error: float | None,
    budget: int,
    return_error: bool,
    stopped_at_dimension: bool = False,
    stacklevel: int = 2,
) -> Tensor | EstimateWithError:
    """Return what an estimator returns, warning if an adaptive run missed its target.

    Args:
        estimate: The estimate.
        error: Its error (``None`` only without ``return_error`` and without a target).
        method: Name of the estimator.
        num_matvecs: Number of products spent.
        target_rel_error: The requested relative error, or ``None``.
        budget: ``max_matvecs`` (with a target).
        return_error: Whether to return an :class:`EstimateWithError`.
        stopped_at_dimension: Whether a sketch stopped growing at the dimension :math:`D`
            rather than at the budget.
        stacklevel: ``warnings.warn``'s stacklevel as seen from the caller of this function.

    Returns:
        The estimate, or with ``return_error`` an :class:`EstimateWithError`.
    """
    if error is None:
        return estimate
    result = EstimateWithError(
        estimate,
        error,
        method=method,
        num_matvecs=num_matvecs,
        target_rel_error=target_rel_error,
    )
    if not result.target_reached:
        reached, target = result.relative_error, target_rel_error
        if stopped_at_dimension:
            why = (
                f"its sketch reached the dimension of the operator after {num_matvecs} "
                "products, so it cannot grow further (max_matvecs "
                f"= {budget}); compute the trace exactly instead (e.g. A.trace() or the "
                "diagonal of the dense matrix) or relax target_rel_error"
            )
        else:
            needed = num_matvecs * (reached / target) ** 2
            if needed <= 100 * budget:
                how = f"roughly {math.ceil(needed)} products would reach the target"
            else:
                how = f"the target needs about {needed:.1g} products, out of reach"
            why = (
                f"it spent {num_matvecs} products (max_matvecs = {budget}). Raise "
                f"max_matvecs (the error shrinks about like 1/sqrt(products): {how}) or "
                "relax target_rel_error"
            )
        warnings.warn(
            BudgetExhaustedWarning(
                f"{method} stopped at a relative error of {reached:.3g}, above "
                f"target_rel_error = {target:g}: {why}. The result is flagged with "
                "target_reached=False when return_error=True."
            ),
            stacklevel=stacklevel + 1,
        )
    return result if return_error else estimate
