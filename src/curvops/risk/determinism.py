"""The determinism check shared by every data-dependent operator (paper §2.2).

An operator must represent a fixed matrix: the same product for the same vector, whatever
the batching or the global RNG state. The check evaluates a probe (loss, gradient and, where
cheap, a product) twice, each time from a different global RNG state (restored afterwards),
so dropout, random augmentation and shuffling loaders with ``drop_last`` show up. When
distributed, each rank checks its own shard and all ranks agree on the verdict, so either all
raise (naming the offending ranks) or none does (NOTE [data parallelism]).

A probe may return its parts by name (loss, gradient, product); a part with NaN or Inf
entries raises :class:`FloatingPointError` naming it (NOTE [non-finite values]) instead of
being compared, because no tolerance is meaningful for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from curvops.risk.empirical_risk import EmpiricalRisk
from curvops.risk.finite import require_finite

Probe = Callable[[], Tensor | Mapping[str, Tensor]]

_SEEDS = (20240, 20241)


class NonDeterministicError(RuntimeError):
    """Raised when two evaluations of the same quantity differ (see ``check_deterministic``)."""


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)


def _named_parts(result: Tensor | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """The probe's result as named flat parts (one part named ``what`` for a plain tensor)."""
    if isinstance(result, Mapping):
        return {name: t.reshape(-1) for name, t in result.items()}
    return {what: result.reshape(-1)}


def _agree(first: Tensor, second: Tensor) -> bool:
    """Whether two finite evaluations agree up to the dtype's tolerance (relative to ``first``)."""
    if first.numel() == 0:
        return True
    rtol, atol_rel = _tolerances(first.dtype)
    scale = max(first.abs().max().item(), 1e-30)
    return torch.allclose(first, second, rtol=rtol, atol=atol_rel * scale)


def _check_locally(risk: EmpiricalRisk, probe: Probe, owner: str, what: str):
    results = []
    with risk.rng_isolation(seeds=True):
        for seed in _SEEDS:
            torch.manual_seed(seed)
            results.append(_named_parts(probe(), what))
    first, second = results
    for name in first:  # NOTE [non-finite values]: never compare with a NaN tolerance
        require_finite([first[name], second[name]], owner=owner, what=f"the {name}")
    if not all(_agree(first[name], second[name]) for name in first):
        raise NonDeterministicError(
            f"{owner}: two evaluations of {what} differ, so the operator would not represent a "
            "fixed matrix. Usual causes: dropout or BatchNorm in train mode (call "
            "model.eval()), a DataLoader with shuffle=True or a random sampler, random data "
            "augmentation, or drop_last=True. Fix the cause, or pass "
            "check_deterministic=False if you know what you are doing."
        )


def check_deterministic(risk: EmpiricalRisk, probe: Probe, *, owner: str, what: str) -> None:
    """Evaluate ``probe`` twice from different global RNG states; raise if the results differ.

    Args:
        risk: The operator's data loop (for RNG isolation and the process group).
        probe: Returns everything to compare: a tensor, or a mapping from names (e.g.
            ``"loss"``, ``"gradient"``, ``"product"``) to tensors.
        owner: Name of the operator, for the message.
        what: What the probe evaluates, for the message.

    Raises:
        NonDeterministicError: If the two evaluations differ (on any rank).
        FloatingPointError: If a part contains NaN or Inf, naming the part.
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


def loss_and_gradient_probe(risk: EmpiricalRisk) -> dict[str, Tensor]:
    """Loss and gradient of the risk as named flat parts (none if there is no loss)."""
    if risk.loss is None:
        return {}
    loss, grads = risk.loss_and_gradient()
    return {"loss": loss.reshape(1), "gradient": torch.cat([g.reshape(-1) for g in grads])}
