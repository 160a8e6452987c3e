"""Build curvature operators by name (the ``--curvature`` option and the tour's panels)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from torch import Tensor, nn

from curvops.cli.errors import CLIError
from curvops.curvature import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from curvops.linear_operator import LinearOperator


class Curvature(str, Enum):
    """Curvature matrices the command line knows.

    Attributes:
        HESSIAN: The Hessian of the empirical risk (paper eq. (2)).
        GGN: The generalized Gauss-Newton matrix (paper eq. (3)).
        EF: The empirical Fisher (paper eq. (6)).
        MC: The Monte-Carlo Fisher with one sample (paper eq. (5)).
        KFAC: KFAC of the GGN (type-2 Fisher; Martens & Grosse (2015)).
        EKFAC: Eigenvalue-corrected KFAC of the GGN (George et al. (2018)).
    """

    HESSIAN = "hessian"
    GGN = "ggn"
    EF = "ef"
    MC = "mc"
    KFAC = "kfac"
    EKFAC = "ekfac"


TITLES = {
    Curvature.HESSIAN: "Hessian",
    Curvature.GGN: "GGN",
    Curvature.EF: "Empirical Fisher",
    Curvature.MC: "MC Fisher",
    Curvature.KFAC: "KFAC (type-2)",
    Curvature.EKFAC: "EKFAC (type-2)",
}


def parse_curvature(name: str) -> Curvature:
    """Parse a curvature name.

    Args:
        name: One of the values of :class:`Curvature`.

    Returns:
        The enum member.

    Raises:
        CLIError: For an unknown name.
    """
    try:
        return Curvature(name)
    except ValueError:
        allowed = "|".join(c.value for c in Curvature)
        raise CLIError(f"unknown curvature {name!r}; use one of {allowed}.") from None


def build_curvature(
    curvature: Curvature | str,
    model: nn.Module,
    loss_func: nn.Module,
    params: list[Tensor],
    data: Iterable,
    *,
    progressbar: bool = False,
    check_deterministic: bool = True,
    seed: int = 0,
) -> LinearOperator:
    """Create the operator of a named curvature matrix.

    Args:
        curvature: Which matrix.
        model: The model.
        loss_func: The loss.
        params: The parameters.
        data: Re-iterable of ``(X, y)`` batches.
        progressbar: Show progress bars over the data.
        check_deterministic: Run the operators' determinism check.
        seed: Seed of the Monte-Carlo Fisher's private generator.

    Returns:
        The operator.
    """
    curvature = parse_curvature(curvature) if isinstance(curvature, str) else curvature
    common = {"progressbar": progressbar, "check_deterministic": check_deterministic}
    if curvature == Curvature.HESSIAN:
        return HessianLinearOperator(model, loss_func, params, data, **common)
    if curvature == Curvature.GGN:
        return GGNLinearOperator(model, loss_func, params, data, **common)
    if curvature == Curvature.EF:
        return EFLinearOperator(model, loss_func, params, data, **common)
    if curvature == Curvature.MC:
        return FisherMCLinearOperator(model, loss_func, params, data, seed=seed, **common)
    from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator

    cls = KFACLinearOperator if curvature == Curvature.KFAC else EKFACLinearOperator
    return cls(model, loss_func, params, data, fisher_type="type-2", **common)
