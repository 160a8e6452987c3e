"""String enums for the options of the Kronecker family, and their validation.

Every option is a string enum (``FisherType.MC == "mc"``), so users may pass either the enum
member or its string value.
"""

from __future__ import annotations

from enum import Enum


class FisherType(str, Enum):
    """Which curvature matrix the gradient factor :math:`B` approximates.

    Attributes:
        TYPE2: The type-II Fisher, i.e. the GGN: backpropagates the columns of a square root
            of the loss Hessian w.r.t. the model output, one set per output position
            (``C · T`` columns for cross-entropy on ``[N, C, T]``; the limit of ``MC``).
        MC: The Monte-Carlo Fisher: backpropagates gradients of would-be labels sampled
            from the model's likelihood.
        EMPIRICAL: The empirical Fisher: backpropagates the gradients of the observed labels.
        FORWARD_ONLY: No backpropagation; :math:`B = I` (FOOF, Benzing (2022); ISAAC,
            Petersen et al. (2023)). See NOTE [forward-only scaling] in
            :mod:`curvops.kronecker.kfac`.
    """

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACType(str, Enum):
    """How layers with weight sharing (sequences, convolutions) are approximated.

    Eschenhagen, R., Immer, A., Turner, R. E., Schneider, F., Hennig, P. (2023).
    Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures.

    Attributes:
        EXPAND: Treat every shared position as an extra datum (exact for position-wise
            networks whose loss has one term per position).
        REDUCE: Aggregate over the shared positions before forming the factors (exact when
            the positions are aggregated before the loss).
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class FallbackType(str, Enum):
    """What to do with parameters that no supported layer (Linear, Conv, Embedding) owns.

    Attributes:
        DIAGONAL: Use a diagonal block holding the exact diagonal of the curvature matrix
            that ``fisher_type`` names (from per-datum gradients w.r.t. these parameters,
            obtained from the same backpropagated output factors).
    """

    DIAGONAL = "diagonal"


def parse_enum(value: object, enum: type[Enum], name: str) -> Enum:
    """Convert a string or enum member into a member of ``enum``.

    Args:
        value: The user's value.
        enum: The enum class.
        name: The argument's name, for the error message.

    Returns:
        The enum member.

    Raises:
        ValueError: If ``value`` is no value of ``enum``.
    """
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Unknown {name}={value!r}. Use one of {allowed}.") from None
