"""The determinism check shared by every data-dependent operator (paper §2.2).

An operator must represent a fixed matrix: the same product for the same vector, whatever
the batching or the global RNG state. The check evaluates a probe (loss, gradient and, where
cheap, a product) twice, each time from a different global RNG state (restored afterwards),
so dropout, random augmentation and shuffling loaders with ``drop_last`` show up. When
distributed, each rank checks its own shard and all ranks agree on the verdict, so either all
raise (naming the offending ranks) or none does (NOTE [data parallelism]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvops.risk.empirical_risk import EmpiricalRisk

_SEEDS = (20240, 20241)


class NonDeterministicError(RuntimeError):
    """Raised when two evaluations of the same quantity differ (see ``check_deterministic``)."""


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)


def _check_locally(risk: EmpiricalRisk, probe: Callable[[], Tensor], owner: str, what: str):
    results = []
    with risk.rng_isolation():
        for seed in _SEEDS:
            torch.manual_seed(seed)
            results.append(probe())
    first, second = results
    rtol, atol_rel = _tolerances(first.dtype)
    scale = max(first.abs().max().item(), 1e-30)
    if not torch.allclose(first, second, rtol=rtol, atol=atol_rel * scale):
        raise NonDeterministicError(
            f"{owner}: two evaluations of {what} differ, so the operator would not represent a "
            "fixed matrix. Usual causes: dropout or BatchNorm in train mode (call "
            "model.eval()), a DataLoader with shuffle=True or a random sampler, random data "
            "augmentation, or drop_last=True. Fix the cause, or pass "
            "check_deterministic=False if you know what you are doing."
        )


def check_deterministic(
    risk: EmpiricalRisk, probe: Callable[[], Tensor], *, owner: str, what: str
) -> None:
    """Evaluate ``probe`` twice from different global RNG states; raise if the results differ.

    Args:
        risk: The operator's data loop (for RNG isolation and the process group).
        probe: Returns a flat tensor of everything to compare (e.g. loss, gradient, product).
        owner: Name of the operator, for the message.
        what: What the probe evaluates, for the message.

    Raises:
        NonDeterministicError: If the two evaluations differ (on any rank).
    """
    group = risk.group
    if not group.active:
        _check_locally(risk, probe, owner, what)
        return

    def local_verdict() -> str | None:
        try:
            with group.local():
                _check_locally(risk, probe, owner, what)
        except NonDeterministicError as e:
            return str(e)
        return None

    verdicts = group.gather_objects(local_verdict, what="The determinism check")
    bad = [r for r, message in enumerate(verdicts) if message is not None]
    if bad:
        raise NonDeterministicError(
            f"The determinism check failed on rank(s) {bad} of {len(verdicts)}; rank "
            f"{bad[0]} reports: {verdicts[bad[0]]}"
        )


def loss_and_gradient_probe(risk: EmpiricalRisk) -> Tensor:
    """Loss and gradient of the risk as one flat tensor (empty if there is no loss)."""
    if risk.loss is None:
        return torch.zeros(0, dtype=risk.dtype, device=risk.device)
    loss, grads = risk.loss_and_gradient()
    return torch.cat([loss.reshape(1), *[g.reshape(-1) for g in grads]])
