"""Matrix-free linear algebra on linear operators (or dense matrices).

Everything here sees only the :class:`~curvops.LinearOperator` interface (block products
``A @ X`` with flat ``[D, K]`` matrices) and also accepts a plain dense ``torch.Tensor``.
"""

from curvops.linalg._sampling import Distribution
from curvops.linalg.eigsh import Which, eigsh
from curvops.linalg.estimators import (
    BudgetExhaustedWarning,
    EstimateWithError,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_squared_fro_halved,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)
from curvops.linalg.inverses import (
    CGInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvops.linalg.sketches import (
    ErrorNorm,
    estimate_approximation_error,
    nystrom_approximation,
    randomized_eigh,
)
from curvops.linalg.spectral import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvops.linalg.submatrix import SubmatrixLinearOperator

__all__ = [
    "BudgetExhaustedWarning",
    "CGInverseLinearOperator",
    "Distribution",
    "ErrorNorm",
    "EstimateWithError",
    "LanczosApproximateLogSpectrumCached",
    "LanczosApproximateSpectrumCached",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "SubmatrixLinearOperator",
    "Which",
    "eigsh",
    "estimate_approximation_error",
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "hutchinson_squared_fro_halved",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_approximate_log_spectrum",
    "lanczos_approximate_spectrum",
    "nystrom_approximation",
    "randomized_eigh",
    "xdiag",
    "xtrace",
]
