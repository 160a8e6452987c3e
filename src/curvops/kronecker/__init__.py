"""The Kronecker family: KFAC, EKFAC, KFOC and their damped inverses as linear operators.

Layer statistics (inputs, output gradients) are collected in one pass over the data
(:mod:`curvops.kronecker.collection`); per-layer-type math (:mod:`curvops.kronecker.layers`)
turns them into factors (:mod:`curvops.kronecker.factors`); the operators are assembled from
the structured operators of :mod:`curvops.structured`.
"""

from curvops.kronecker.ekfac import EKFACLinearOperator
from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.inverse import EKFACInverseLinearOperator, KFACInverseLinearOperator
from curvops.kronecker.kfac import KFACLinearOperator
from curvops.kronecker.kfoc import KFOCLinearOperator
from curvops.kronecker.options import FallbackType, FisherType, KFACType
from curvops.kronecker.staleness import OnStale, StaleFactorsError

__all__ = [
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
]
