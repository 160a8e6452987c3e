"""curvops: curvature matrices of neural nets as PyTorch linear operators.

Everything users type is importable from the top level, e.g.
``from curvops import GGNLinearOperator, CGInverseLinearOperator, hutchinson_diag``.
"""

from curvops.curvature import (
    CurvatureLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    NonDeterministicError,
    TransposedJacobianLinearOperator,
)
from curvops.kronecker import (
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    FallbackType,
    FisherType,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFACType,
    KFOCLinearOperator,
    LayerFactors,
    OnStale,
    StaleFactorsError,
)
from curvops.linalg import (
    CGInverseLinearOperator,
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
    SubmatrixLinearOperator,
    eigsh,
    estimate_approximation_error,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_squared_fro_halved,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
    nystrom_approximation,
    randomized_eigh,
    xdiag,
    xtrace,
)
from curvops.linear_operator import LinearOperator
from curvops.risk import DistributedRankError, synchronized_generator
from curvops.structured import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    EigendecompositionLinearOperator,
    IdentityLinearOperator,
    KroneckerEigenLinearOperator,
    KroneckerProductLinearOperator,
    TensorLinearOperator,
)

__all__ = [
    # operator algebra and structured operators
    "LinearOperator",
    "BlockDiagonalLinearOperator",
    "DiagonalLinearOperator",
    "EigendecompositionLinearOperator",
    "IdentityLinearOperator",
    "KroneckerEigenLinearOperator",
    "KroneckerProductLinearOperator",
    "TensorLinearOperator",
    # exact curvature
    "CurvatureLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "JacobianLinearOperator",
    "NonDeterministicError",
    "TransposedJacobianLinearOperator",
    # Kronecker family
    "EKFACInverseLinearOperator",
    "EKFACLinearOperator",
    "FallbackType",
    "FisherType",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
    "KFACType",
    "KFOCLinearOperator",
    "LayerFactors",
    "OnStale",
    "StaleFactorsError",
    # data parallelism
    "DistributedRankError",
    "synchronized_generator",
    # matrix-free linear algebra
    "CGInverseLinearOperator",
    "LSMRInverseLinearOperator",
    "LanczosApproximateLogSpectrumCached",
    "LanczosApproximateSpectrumCached",
    "NeumannInverseLinearOperator",
    "SubmatrixLinearOperator",
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
__version__ = "0.1.0"
