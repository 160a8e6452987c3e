"""Argument checks shared by the randomized estimators (private)."""

from __future__ import annotations

from curvops.linalg._inputs import check_positive_float, check_positive_int


def check_num_matvecs(
    num_matvecs: object,
    method: str,
    *,
    multiple_of: int = 1,
    minimum: int = 1,
    maximum: int | None = None,
    maximum_reason: str = "",
) -> int:
    """Check that ``num_matvecs`` is a budget the estimator can use.

    Args:
        num_matvecs: Number of matrix-vector products.
        method: Name of the estimator, used in error messages.
        multiple_of: ``num_matvecs`` must be divisible by this.
        minimum: Smallest allowed value.
        maximum: Largest meaningful value, or ``None``.
        maximum_reason: Why larger values are meaningless (for the error message).

    Returns:
        ``num_matvecs`` as an int.

    Raises:
        TypeError: If ``num_matvecs`` is not an integer.
        ValueError: If it is not divisible, too small or too large.
    """
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
    if num_matvecs % multiple_of != 0:
        raise ValueError(
            f"{method} needs num_matvecs divisible by {multiple_of}, got {num_matvecs}. Use "
            f"{multiple_of * max(1, round(num_matvecs / multiple_of))} instead."
        )
    if num_matvecs < minimum:
        raise ValueError(f"{method} needs num_matvecs >= {minimum}, got {num_matvecs}.")
    if maximum is not None and num_matvecs > maximum:
        raise ValueError(
            f"{method} needs num_matvecs <= {maximum}, got {num_matvecs}: {maximum_reason}"
        )
    return num_matvecs


def check_adaptive(
    target_rel_error: object, max_matvecs: object, num_matvecs: int
) -> tuple[float | None, int]:
    """Check the options of adaptive stopping.

    Args:
        target_rel_error: Target relative error, or ``None`` (no adaptive stopping).
        max_matvecs: Budget of products when stopping adaptively.
        num_matvecs: Products of the first estimate.

    Returns:
        The target (or ``None``) and the budget (``num_matvecs`` without a target).

    Raises:
        ValueError: If ``max_matvecs`` is missing, smaller than ``num_matvecs``, or given
            without a target.
    """
    if target_rel_error is None:
        if max_matvecs is not None:
            raise ValueError(
                "max_matvecs only applies with target_rel_error; pass a target_rel_error or "
                "drop max_matvecs."
            )
        return None, num_matvecs
    target = check_positive_float(target_rel_error, "target_rel_error")
    if max_matvecs is None:
        raise ValueError(
            "target_rel_error needs max_matvecs, the largest number of products to spend; "
            "pass e.g. max_matvecs=10 * num_matvecs."
        )
    max_matvecs = check_positive_int(max_matvecs, "max_matvecs")
    if max_matvecs < num_matvecs:
        raise ValueError(
            f"max_matvecs ({max_matvecs}) must be at least num_matvecs ({num_matvecs})."
        )
    return target, max_matvecs


def relative(error, estimate) -> float:
    """``error / |estimate|`` as a float (``inf`` for a zero estimate)."""
    denominator = float(abs(estimate))
    return float(error) / denominator if denominator > 0 else float("inf")
