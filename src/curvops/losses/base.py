r"""What ``curvops`` knows about any loss module: its reduction and its normaliser.

NOTE [loss scaling]: a loss module maps a batch of outputs to the *batch loss*

.. math::
    \mathcal{L}_\mathbb{B} = R_\mathbb{B} \sum_{i \in \mathbb{B}} c_i \ell_i,
    \qquad R_\mathbb{B} = 1 / Z_\mathbb{B} \text{ for ``"mean"``}, \quad
    R_\mathbb{B} = 1 \text{ for ``"sum"``},

a (weighted) sum over the batch's *loss terms* :math:`\ell_i` (paper eq. (1)). The
*normaliser* :math:`Z_\mathbb{B}` is PyTorch's own denominator of ``reduction="mean"``:

* ``MSELoss``, ``BCEWithLogitsLoss`` and other element-wise losses: the number of entries
  (``BCEWithLogitsLoss``'s ``weight`` and ``pos_weight`` multiply terms but do not enter
  :math:`Z`);
* ``CrossEntropyLoss``/``NLLLoss`` with class labels: the number of targets that are not
  ``ignore_index``, or with ``weight=`` the sum :math:`\sum_i w_{y_i}` over them (the term
  weights are :math:`c_i = w_{y_i}`, and :math:`c_i = 0` at ignored targets); with class
  probabilities as targets: the number of positions (data times extra axes);
* any other loss (e.g. a custom ``nn.Module``): the number of data :math:`N_\mathbb{B}` (the
  leading axis of the targets). This is exact only if every datum contributes the same number
  of loss terms; :class:`~curvops.risk.EmpiricalRisk` raises an error if the targets' entries
  per datum differ between batches (see :meth:`LossSpec.terms_per_datum`).

The risk over the data set is the same mean over all of its loss terms,
:math:`\mathcal{L}_\mathbb{D} = \frac{1}{Z_\mathbb{D}} \sum_{i \in \mathbb{D}} c_i \ell_i` with
:math:`Z_\mathbb{D} = \sum_\mathbb{B} Z_\mathbb{B}`, hence
:math:`\mathcal{L}_\mathbb{D} = \sum_\mathbb{B} (Z_\mathbb{B}/Z_\mathbb{D}) \mathcal{L}_\mathbb{B}`
(NOTE [batch weights] of :mod:`curvops.risk.empirical_risk`). Padding, class weights and
sequences of different lengths therefore never change the matrix. Everything a loss
specification returns is *batch-level*: it includes :math:`R_\mathbb{B}`.

NOTE [loss terms and positions]: the loss terms of a datum sit at its *positions*. A datum's
output is viewed as ``[P, F]``: ``F`` *features* that one loss term reads (the classes, axis 1
of ``CrossEntropyLoss``'s ``[N, C, *]`` output; the last axis of ``MSELoss`` and
``BCEWithLogitsLoss``) at ``P`` positions (all other non-data axes, e.g. the tokens of a
sequence). The loss of a datum, :math:`\ell_n = \sum_p \ell_{n,p}`, sums its positions; the
empirical Fisher can take gradients per loss term (position) or per datum
(:class:`~curvops.EFLinearOperator`'s ``gradient_of``).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor, nn

SUPPORTED_FISHER_LOSSES = ("MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss")


class FactorKind(str, Enum):
    """Which output-space matrix :meth:`LikelihoodLossSpec.output_factors` factorises."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"


class LossSpec:
    """What ``curvops`` knows about a loss module (the base: any loss, e.g. a custom one).

    Args:
        loss_func: The loss module.
        reduction: ``"mean"`` or ``"sum"``.
        fisher_refusal: Why Fisher-type quantities are unavailable (appended to the error
            message of :meth:`require_fisher`).

    Attributes:
        loss_func: The loss module.
        name: Its class name.
        reduction: ``"mean"`` or ``"sum"``.
        supports_fisher: Whether Fisher-type quantities (MC, empirical, type-2 factors) are
            available.
    """

    supports_fisher = False
    #: Whether :meth:`normaliser` follows PyTorch's own definition (``False``: data count).
    knows_normaliser = False

    def __init__(self, loss_func: nn.Module, reduction: str, fisher_refusal: str = ""):
        self.loss_func = loss_func
        self.name = type(loss_func).__name__
        self.reduction = reduction
        self._fisher_refusal = fisher_refusal

    def __call__(self, output: Tensor, y: Tensor) -> Tensor:
        """Evaluate the batch loss."""
        return self.loss_func(output, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, reduction={self.reduction!r})"

    # ---------------------------------------------------------------- checks
    def require_fisher(self, what: str) -> None:
        """Raise a clear error if Fisher-type quantities are unavailable for this loss.

        Args:
            what: The name of the operator asking, for the error message.

        Raises:
            NotImplementedError: If the loss has no likelihood interpretation.
        """
        if not self.supports_fisher:
            raise NotImplementedError(
                f"{what} needs a likelihood interpretation of the loss, available for "
                f"{', '.join(SUPPORTED_FISHER_LOSSES)} (without class weights, weight or "
                f"pos_weight); got {self.name}{self._fisher_refusal}. Use "
                f"HessianLinearOperator or GGNLinearOperator, which accept any twice-"
                f"differentiable loss."
            )

    # ---------------------------------------------------------------- scaling
    def normaliser(self, y: object, batch_size: int) -> float:
        r"""The batch normaliser :math:`Z_\mathbb{B}` of ``reduction="mean"`` (NOTE [loss scaling]).

        Computed from the targets alone (no forward pass). This base class does not know the
        loss and counts data.

        Args:
            y: The batch's targets.
            batch_size: The batch's number of data.

        Returns:
            :math:`Z_\mathbb{B}` (``0`` if every loss term of the batch is ignored).
        """
        return float(batch_size)

    def reduction_factor(self, y: object, batch_size: int) -> float:
        r"""The batch reduction factor :math:`R_\mathbb{B}` (NOTE [loss scaling]).

        Args:
            y: The batch's targets.
            batch_size: The batch's number of data.

        Returns:
            :math:`1/Z_\mathbb{B}` for ``"mean"``, ``1`` for ``"sum"``.

        Raises:
            ValueError: For ``"mean"`` on a batch whose loss terms are all ignored.
        """
        if self.reduction == "sum":
            return 1.0
        z = self.normaliser(y, batch_size)
        if z == 0:
            raise ValueError(
                f"{self.name}(reduction='mean') of this batch divides by zero: every loss "
                "term is ignored (e.g. all targets are ignore_index). Such batches contribute "
                "nothing; the data loop skips them."
            )
        return 1.0 / z

    def terms_per_datum(self, y: object, batch_size: int) -> int | None:
        """Entries of the targets per datum, for the consistency check of data-count normalisers.

        For a loss whose normaliser is the data count (:attr:`knows_normaliser` is
        ``False``), ``reduction="mean"`` is the mean over loss terms only if every datum has
        the same number of them; the data loop raises an error if this count differs
        between batches.

        Args:
            y: The batch's targets.
            batch_size: The batch's number of data.

        Returns:
            The number of target entries per datum, or ``None`` if unknown (non-tensor
            targets) or if the normaliser is known.
        """
        if self.knows_normaliser or not isinstance(y, Tensor) or y.ndim == 0:
            return None
        if y.shape[0] != batch_size or batch_size == 0:
            return None
        return y[0].numel()

    def term_mask(self, y: object) -> Tensor | None:
        """Which loss terms count (``False`` at ignored targets), shaped like the positions.

        Args:
            y: The batch's targets.

        Returns:
            A boolean tensor ``[N, *positions]``, or ``None`` if every term counts.
        """
        return None

    def output_factors(self, output: Tensor, y: Tensor, kind: str, **kwargs) -> Tensor:
        """Output factors of Fisher-type matrices: unavailable without a likelihood.

        Raises:
            NotImplementedError: Always (see :meth:`require_fisher`).
        """
        self.require_fisher(f"output_factors(kind={kind!r})")
        raise NotImplementedError  # pragma: no cover - require_fisher raised

    shared_output_factors = output_factors


class ElementwiseLossSpec(LossSpec):
    """An element-wise loss (``MSELoss``, ``L1Loss``, ``BCELoss``, ...): one term per entry."""

    knows_normaliser = True

    def normaliser(self, y: object, batch_size: int) -> float:  # noqa: D102
        if not isinstance(y, Tensor):
            raise TypeError(f"{self.name} needs tensor targets, got {type(y).__name__}.")
        return float(y.numel())


def class_index_normaliser(y: Tensor, weight: Tensor | None, ignore_index: int) -> float:
    r"""PyTorch's ``"mean"`` normaliser of ``CrossEntropyLoss``/``NLLLoss``.

    Args:
        y: Targets: class indices ``[N, *]`` or class probabilities ``[N, C, *]``.
        weight: The class weights, or ``None``.
        ignore_index: Targets equal to it are ignored (class indices only).

    Returns:
        :math:`\sum_{i: y_i \neq \text{ignore}} w_{y_i}` (the number of such targets without
        weights) for class indices; the number of positions for probabilities.
    """
    if y.is_floating_point():
        return float(y.numel() // y.shape[1]) if y.ndim >= 2 else 1.0
    keep = y != ignore_index
    if weight is None:
        return float(keep.sum())
    w = weight.detach().to(device=y.device, dtype=torch.float64)
    return float(w[y[keep]].sum())


class ClassIndexLossSpec(LossSpec):
    """``NLLLoss`` (and the normaliser shared with ``CrossEntropyLoss``)."""

    knows_normaliser = True
    _last_term_mask: tuple[Tensor, int, Tensor | None] | None = None

    def normaliser(self, y: object, batch_size: int) -> float:  # noqa: D102
        if not isinstance(y, Tensor):
            raise TypeError(f"{self.name} needs tensor targets, got {type(y).__name__}.")
        return class_index_normaliser(y, self.loss_func.weight, self.loss_func.ignore_index)

    def term_mask(self, y: object) -> Tensor | None:  # noqa: D102
        if not isinstance(y, Tensor) or y.is_floating_point():
            return None
        # the mask of the last targets is kept: a KFAC pass asks three times per batch, and
        # each answer costs a comparison and a synchronisation (same tensor, same version)
        last = self._last_term_mask
        if last is not None and last[0] is y and last[1] == y._version:
            return last[2]
        keep = y != self.loss_func.ignore_index
        mask = None if bool(keep.all()) else keep
        self._last_term_mask = (y, y._version, mask)
        return mask
