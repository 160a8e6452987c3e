"""Structured linear operators: dense, eigendecomposed, identity, diagonal, Kronecker, blocks.

Each operator knows closed forms for its ``trace()``, ``logdet()``, ``det()``,
``frobenius_norm()``, ``diagonal()`` and ``inverse(damping)``, so that structured curvature
approximations composed from them (KFAC, EKFAC, low-rank) inherit these for free.
"""

from curvops.structured.block_diagonal import BlockDiagonalLinearOperator
from curvops.structured.diagonal import DiagonalLinearOperator
from curvops.structured.eigendecomposition import EigendecompositionLinearOperator
from curvops.structured.identity import IdentityLinearOperator
from curvops.structured.kronecker import KroneckerProductLinearOperator
from curvops.structured.kronecker_eigen import KroneckerEigenLinearOperator
from curvops.structured.tensor import TensorLinearOperator

__all__ = [
    "BlockDiagonalLinearOperator",
    "DiagonalLinearOperator",
    "EigendecompositionLinearOperator",
    "IdentityLinearOperator",
    "KroneckerEigenLinearOperator",
    "KroneckerProductLinearOperator",
    "TensorLinearOperator",
]
