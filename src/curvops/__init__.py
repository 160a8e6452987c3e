"""curvops: curvature matrices of neural nets as PyTorch linear operators."""

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
from curvops.linear_operator import LinearOperator
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
    "BlockDiagonalLinearOperator",
    "DiagonalLinearOperator",
    "EigendecompositionLinearOperator",
    "IdentityLinearOperator",
    "KroneckerEigenLinearOperator",
    "KroneckerProductLinearOperator",
    "TensorLinearOperator",
    "CurvatureLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "JacobianLinearOperator",
    "LinearOperator",
    "NonDeterministicError",
    "TransposedJacobianLinearOperator",
]
__version__ = "0.1.0"
