"""curvops: curvature matrices of neural nets as PyTorch linear operators."""

from curvops.linear_operator import LinearOperator

__all__ = ["LinearOperator"]
__version__ = "0.1.0"
