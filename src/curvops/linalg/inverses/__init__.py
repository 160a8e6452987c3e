"""Inverses of linear operators as linear operators: CG, Neumann series and LSMR."""

from curvops.linalg.inverses.cg import CGInfo, CGInverseLinearOperator
from curvops.linalg.inverses.lsmr import LSMRInfo, LSMRInverseLinearOperator
from curvops.linalg.inverses.neumann import NeumannInfo, NeumannInverseLinearOperator

__all__ = [
    "CGInfo",
    "CGInverseLinearOperator",
    "LSMRInfo",
    "LSMRInverseLinearOperator",
    "NeumannInfo",
    "NeumannInverseLinearOperator",
]
