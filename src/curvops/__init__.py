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

__all__ = [
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
