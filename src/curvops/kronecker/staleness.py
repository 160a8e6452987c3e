"""Factors computed at old parameters: detection and policy (``on_stale``).

NOTE [stale factors]: KFAC and EKFAC compute their factors (and eigendecompositions,
eigenvalue corrections, inverse factors) once and reuse them; the exact operators instead read
the parameters at every product. An in-place change of a parameter after the factors were
computed (an optimiser step, ``model.load_state_dict``, ``p.copy_(...)``) leaves the factors
describing the *old* parameters, and products would silently mix old curvature with the new
model. Every such change increments the tensor's version counter (``p._version``, the
counter autograd uses to detect in-place changes of saved tensors), so the operators record
the versions (and storage addresses, which change when ``p.data`` is replaced) of their
parameters when the factors are computed or loaded, and compare them before every use:

* ``on_stale="raise"`` (default): raise :class:`StaleFactorsError`, saying how to refresh;
* ``on_stale="recompute"``: recompute the factors (a pass over the data) and go on;
* ``on_stale="ignore"``: keep using the old factors, e.g. in a KFAC optimiser that refreshes
  its preconditioner only every few steps (Martens & Grosse, 2015, §8).

In-place changes through ``p.data`` (``p.data.add_(...)``) bypass the version counter and are
not detected. Inverses remember the versions of the factors they were built from and follow
the policy of their KFAC/EKFAC operator.
"""

from __future__ import annotations

from enum import Enum

from torch import Tensor

ParameterVersions = tuple[tuple[int, int], ...]


class OnStale(str, Enum):
    """What a KFAC-type operator does when its parameters changed since its factors were computed.

    See NOTE [stale factors].

    Attributes:
        RAISE: Raise :class:`StaleFactorsError`.
        RECOMPUTE: Recompute the factors at the current parameters.
        IGNORE: Keep using the old factors.
    """

    RAISE = "raise"
    RECOMPUTE = "recompute"
    IGNORE = "ignore"


class StaleFactorsError(RuntimeError):
    """Raised by KFAC-type operators whose parameters changed since their factors were computed."""


def parameter_versions(params: list[Tensor]) -> ParameterVersions:
    """Version counter and storage address of every parameter (NOTE [stale factors])."""
    return tuple((p._version, p.data_ptr()) for p in params)


def changed_parameters(
    recorded: ParameterVersions, params: list[Tensor], names: list[str]
) -> list[str]:
    """Names of the parameters whose version or storage differs from ``recorded``.

    Args:
        recorded: The versions when the factors were computed.
        params: The parameters now.
        names: Their names, in the same order.

    Returns:
        The names of the changed parameters (empty if none changed).
    """
    return [n for n, old, new in zip(names, recorded, parameter_versions(params)) if old != new]


def stale_error(owner: str, changed: list[str], fix: str) -> StaleFactorsError:
    """The error for factors that describe old parameters.

    Args:
        owner: The operator, e.g. ``"KFACLinearOperator"``.
        changed: Names of the changed parameters.
        fix: How to refresh this operator.

    Returns:
        The error, to be raised by the caller.
    """
    shown = ", ".join(f"'{n}'" for n in changed[:5]) + (", ..." if len(changed) > 5 else "")
    return StaleFactorsError(
        f"{owner}: the parameters {shown} changed in place (e.g. an optimizer step or "
        "load_state_dict) since the factors were computed, so the factors describe the old "
        f"parameters. {fix} Or pass on_stale='recompute' to the KFAC/EKFAC operator to "
        "recompute automatically, or on_stale='ignore' to keep using the old factors "
        "(NOTE [stale factors])."
    )
