"""The empirical risk: the one data loop over batches, with scaling, devices and safeguards."""

from curvops.risk.determinism import NonDeterministicError, check_deterministic
from curvops.risk.distributed import (
    DistributedRankError,
    ProcessGroupHandle,
    per_rank_seed,
    synchronized_generator,
)
from curvops.risk.empirical_risk import Batch, EmpiricalRisk

__all__ = [
    "Batch",
    "DistributedRankError",
    "EmpiricalRisk",
    "NonDeterministicError",
    "ProcessGroupHandle",
    "check_deterministic",
    "per_rank_seed",
    "synchronized_generator",
]
