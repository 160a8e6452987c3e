"""The empirical risk: the one data loop over batches, with scaling, devices and safeguards."""

from curvops.risk.empirical_risk import Batch, EmpiricalRisk

__all__ = ["Batch", "EmpiricalRisk"]
