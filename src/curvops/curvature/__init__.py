"""Exact (matrix-free) curvature operators of the empirical risk."""

from curvops.curvature.base import CurvatureLinearOperator, NonDeterministicError
from curvops.curvature.fisher import EFLinearOperator, FisherMCLinearOperator, GradientOf
from curvops.curvature.ggn import GGNLinearOperator
from curvops.curvature.hessian import HessianLinearOperator
from curvops.curvature.jacobian import JacobianLinearOperator, TransposedJacobianLinearOperator

__all__ = [
    "CurvatureLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "GradientOf",
    "HessianLinearOperator",
    "JacobianLinearOperator",
    "NonDeterministicError",
    "TransposedJacobianLinearOperator",
]
