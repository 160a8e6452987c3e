"""Loss knowledge: everything ``curvops`` needs to know about a criterion, in one place.

Operators never special-case losses themselves; they ask the loss specification built by
:func:`make_loss_spec`: one small class per likelihood (:mod:`~curvops.losses.mse`,
:mod:`~curvops.losses.cross_entropy`, :mod:`~curvops.losses.bce`) on a common base
(:mod:`~curvops.losses.base`: reduction, PyTorch's ``"mean"`` normaliser, ignored targets;
:mod:`~curvops.losses.likelihood`: output factors of Fisher-type matrices). See NOTE [loss
scaling], NOTE [loss terms and positions] and NOTE [output factors].
"""

from curvops.losses.base import (
    SUPPORTED_FISHER_LOSSES,
    ClassIndexLossSpec,
    ElementwiseLossSpec,
    FactorKind,
    LossSpec,
)
from curvops.losses.bce import BCEWithLogitsLossSpec
from curvops.losses.cross_entropy import CrossEntropyLossSpec
from curvops.losses.factory import make_loss_spec
from curvops.losses.likelihood import FactorColumns, LikelihoodLossSpec
from curvops.losses.mse import MSELossSpec

__all__ = [
    "SUPPORTED_FISHER_LOSSES",
    "BCEWithLogitsLossSpec",
    "ClassIndexLossSpec",
    "CrossEntropyLossSpec",
    "ElementwiseLossSpec",
    "FactorColumns",
    "FactorKind",
    "LikelihoodLossSpec",
    "LossSpec",
    "MSELossSpec",
    "make_loss_spec",
]
