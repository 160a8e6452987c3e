"""Low-rank sketches of symmetric operators and their a-posteriori error estimates."""

from curvops.linalg.sketches.approximation_error import ErrorNorm, estimate_approximation_error
from curvops.linalg.sketches.nystrom import nystrom_approximation
from curvops.linalg.sketches.randomized_eigh import randomized_eigh

__all__ = [
    "ErrorNorm",
    "estimate_approximation_error",
    "nystrom_approximation",
    "randomized_eigh",
]
