"""Ground truths for verifying operators: dense references and an all-entry-point check."""

from curvops.testing.compare import assert_operator_matches

__all__ = ["assert_operator_matches"]
