"""Ground truths for verifying operators: dense ``torch.func`` references and a checker.

``dense_hessian``, ``dense_ggn``, ``dense_ef``, ``dense_jacobian`` (and
``dense_gradient_and_loss``) build the dense matrices of the same risk the operators
represent, independently of the operators' code;
``assert_operator_matches`` checks an operator against a dense matrix through every entry
point.
"""

from curvops.testing.compare import assert_operator_matches
from curvops.testing.dense import (
    dense_block_diagonal,
    dense_ef,
    dense_ggn,
    dense_gradient_and_loss,
    dense_hessian,
    dense_jacobian,
)

__all__ = [
    "assert_operator_matches",
    "dense_block_diagonal",
    "dense_ef",
    "dense_ggn",
    "dense_gradient_and_loss",
    "dense_hessian",
    "dense_jacobian",
]
