"""Validated options of the randomized estimators (private).

Every estimator (Hutchinson, Hutch++, XTrace, XDiag, the squared Frobenius norms) starts the
same way: wrap ``A``, check it is square (all but the squared Frobenius norms), parse the
distribution, check the budget of products and the adaptive stopping options.
:meth:`EstimatorRules.setup` does this once, in the order the public functions document
their errors, and returns the result as an :class:`EstimatorSetup`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvops.linalg._inputs import as_linear_operator, parse_enum, require_square
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.estimators._checks import check_adaptive, check_num_matvecs
from curvops.linear_operator import LinearOperator


@dataclass(frozen=True)
class EstimatorSetup:
    """Checked inputs of a square estimator.

    Attributes:
        method: Name of the estimator, used in messages.
        A: The operator.
        dim: Dimension :math:`D` of the test vectors.
        distribution: Distribution of the test-vector entries.
        generator: Random number generator (NOTE [estimator randomness] in
            :mod:`curvops.linalg._sampling`).
        num_matvecs: Products of the first estimate (and of each adaptive round).
        target: Target relative error, or ``None`` (no adaptive stopping).
        budget: Largest number of products to spend (``num_matvecs`` without a target).
    """

    method: str
    A: LinearOperator
    dim: int
    distribution: Distribution
    generator: torch.Generator | None
    num_matvecs: int
    target: float | None
    budget: int

    def draw(self, num: int) -> Tensor:
        """Draw ``num`` test vectors as the columns of a ``[D, num]`` matrix."""
        return random_test_matrix(
            self.dim, num, self.distribution, self.generator, self.A.dtype, self.A.device
        )


@dataclass(frozen=True)
class EstimatorRules:
    """How an estimator checks its options.

    An error estimate (``return_error`` or ``target_rel_error``) needs at least two samples,
    so the smallest budget doubles then; the error message then names the method "with an
    error estimate" unless the method always estimates its error.

    Attributes:
        method: Name of the estimator, used in error messages.
        sketch_parts: For sketching methods, the number of equal parts the budget is split
            into, one of which is the sketch size (at most :math:`D`); ``None`` otherwise.
        always_estimates_error: Whether the method needs two samples even without an error
            estimate.
        products_per_sample: Products per sample; the budget must be divisible by it.
        test_vectors: ``"in"`` (square estimators: the operator's input dimension) or
            ``"out"`` (test vectors of the output dimension, for :math:`A A^\\top`).
        square: Whether ``A`` must be square.
    """

    method: str
    sketch_parts: int | None = None
    always_estimates_error: bool = False
    products_per_sample: int = 1
    test_vectors: str = "in"
    square: bool = True

    def setup(
        self,
        A: LinearOperator | Tensor,
        num_matvecs: object,
        distribution: object,
        generator: torch.Generator | None,
        return_error: bool,
        target_rel_error: object,
        max_matvecs: object,
    ) -> EstimatorSetup:
        """Check the arguments shared by the trace and diagonal estimators.

        Args:
            A: Square operator (or dense matrix).
            num_matvecs: Budget of products of the first estimate.
            distribution: ``"rademacher"`` or ``"normal"``.
            generator: Random number generator.
            return_error: Whether the caller returns an error estimate.
            target_rel_error: Target relative error, or ``None``.
            max_matvecs: Budget of products with ``target_rel_error``, or ``None``.

        Returns:
            The checked inputs.

        Raises:
            TypeError: If ``A`` is neither an operator nor a tensor, or an option has the
                wrong type.
            ValueError: If ``A`` is not square or an option is invalid.
        """
        A = as_linear_operator(A)
        if self.square:
            require_square(A, self.method)
        D = A.shape[1] if self.test_vectors == "in" else A.shape[0]
        distribution = parse_enum(distribution, Distribution, "distribution")
        always_two = self.always_estimates_error
        needs_two = always_two or return_error or target_rel_error is not None
        method = self.method
        if self.products_per_sample == 2:
            method += " (two products per sample)"
        if needs_two and not always_two:
            method += " with an error estimate"
        parts = self.products_per_sample if self.sketch_parts is None else self.sketch_parts
        limits = {}
        if self.sketch_parts is not None:
            limits = {
                "maximum": parts * D,
                "maximum_reason": (
                    f"the sketch size num_matvecs / {parts} cannot exceed the dimension {D}."
                ),
            }
        num_matvecs = check_num_matvecs(
            num_matvecs,
            method,
            multiple_of=parts,
            minimum=parts * (2 if needs_two else 1),
            **limits,
        )
        target, budget = check_adaptive(target_rel_error, max_matvecs, num_matvecs)
        return EstimatorSetup(
            self.method, A, D, distribution, generator, num_matvecs, target, budget
        )
