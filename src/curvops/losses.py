r"""Loss knowledge: everything ``curvops`` needs to know about a criterion, in one place.

Operators never special-case losses themselves; they ask the :class:`LossSpec` built by
:func:`make_loss_spec`. It knows each supported loss's reduction factor, the square root of
its Hessian w.r.t. the model output, how to sample would-be labels for the Monte-Carlo Fisher,
and the per-datum gradient used by the empirical Fisher.

NOTE [loss scaling]: a loss module maps a batch of outputs to the *batch loss*
:math:`\mathcal{L}_\mathbb{B} = R_\mathbb{B} \sum_{n \in \mathbb{B}} \ell_n` (paper eq. (1)),
where :math:`\ell_n` is the loss of datum :math:`n` (the leading axis of the model output
indexes data; a datum's loss sums over its other axes, e.g. the positions of a sequence) and
:math:`R_\mathbb{B}` is ``1`` for ``reduction="sum"`` and ``1 / (number of loss terms in the
batch)`` for ``reduction="mean"``. Everything here is *batch-level*: it includes
:math:`R_\mathbb{B}`. The data loop multiplies per-batch results by
:math:`R_\mathbb{D} / R_\mathbb{B}` (see :mod:`curvops.risk`).

Per-datum models of the supported losses as negative log-likelihoods
(:math:`\ell = -\log q(y \mid f)` up to constants):

* ``MSELoss``: :math:`\ell_n = \sum_i (f_{n,i} - y_{n,i})^2`, i.e. a Gaussian with covariance
  :math:`\frac{1}{2} I`; :math:`\nabla_f^2 \ell_n = 2 I`.
* ``CrossEntropyLoss`` (class axis 1, optional extra axes): a categorical per position,
  :math:`\nabla_f^2 \ell = \mathrm{diag}(p) - p p^\top` with :math:`p = \mathrm{softmax}(f)`.
* ``BCEWithLogitsLoss``: a Bernoulli per entry, :math:`\nabla_f^2 \ell = \mathrm{diag}(\sigma(f)
  (1 - \sigma(f)))`.

For these likelihoods the loss Hessian does not depend on the label, so the type-II Fisher
(paper, Appendix B) equals the type-I Fisher and the GGN.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from math import sqrt

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot

SUPPORTED_FISHER_LOSSES = ("MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss")


class FactorKind(str, Enum):
    """Which per-datum output-space matrix :meth:`LossSpec.output_factors` factorises."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"


@dataclass
class LossSpec:
    """What ``curvops`` knows about a loss module.

    Attributes:
        loss_func: The loss module.
        name: Its class name.
        reduction: ``"mean"`` or ``"sum"``.
        supports_fisher: Whether Fisher-type quantities (MC, empirical, type-2 factors) are
            available (the loss is one of ``MSELoss``, ``CrossEntropyLoss``,
            ``BCEWithLogitsLoss`` without weights or label smoothing).
    """

    loss_func: nn.Module
    name: str
    reduction: str
    supports_fisher: bool
    _unsupported_reason: str = ""

    def __call__(self, output: Tensor, y: Tensor) -> Tensor:
        """Evaluate the batch loss."""
        return self.loss_func(output, y)

    # ---------------------------------------------------------------- checks
    def require_fisher(self, what: str) -> None:
        """Raise a clear error if Fisher-type quantities are unavailable for this loss.

        Args:
            what: The name of the operator asking, for the error message.

        Raises:
            NotImplementedError: If the loss is not supported.
        """
        if not self.supports_fisher:
            raise NotImplementedError(
                f"{what} needs a likelihood interpretation of the loss, available for "
                f"{', '.join(SUPPORTED_FISHER_LOSSES)} (without class weights, pos_weight or "
                f"label smoothing); got {self.name}{self._unsupported_reason}. Use "
                f"HessianLinearOperator or GGNLinearOperator, which accept any twice-"
                f"differentiable loss."
            )

    def _check_target(self, output: Tensor, y: Tensor) -> None:
        if self.name == "CrossEntropyLoss":
            if y.dtype.is_floating_point:
                raise NotImplementedError(
                    "Fisher-type quantities with CrossEntropyLoss need integer class labels; "
                    "got floating-point targets (class probabilities)."
                )
            ignore = getattr(self.loss_func, "ignore_index", -100)
            if (y == ignore).any():
                raise NotImplementedError(
                    f"Targets contain ignore_index={ignore}; Fisher-type quantities do not "
                    "support ignored positions. Remove them from the data."
                )
        elif output.shape != y.shape:
            raise ValueError(
                f"{self.name}: output shape {tuple(output.shape)} and target shape "
                f"{tuple(y.shape)} differ."
            )

    # ---------------------------------------------------------------- scaling
    def num_loss_terms(self, output: Tensor) -> int:
        """Number of terms the ``"mean"`` reduction averages over in this batch."""
        if self.name == "CrossEntropyLoss":
            return output.numel() // output.shape[1] if output.ndim >= 2 else 1
        return output.numel()

    def reduction_factor(self, output: Tensor) -> float:
        r"""The batch reduction factor :math:`R_\mathbb{B}` (NOTE [loss scaling])."""
        return 1.0 / self.num_loss_terms(output) if self.reduction == "mean" else 1.0

    # ---------------------------------------------------------------- factors
    def output_factors(
        self,
        output: Tensor,
        y: Tensor,
        kind: str | FactorKind,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Per-datum factors :math:`s_k` of an output-space curvature matrix.

        Returns ``S`` of shape ``[K, *output.shape]`` such that, for every datum ``n``
        (leading axis of ``output``),

        .. math::
            \sum_k s_k[n] s_k[n]^\top = R_\mathbb{B} \cdot
            \begin{cases}
            \nabla_f^2 \ell_n & \text{type-2 (loss Hessian square root)} \\
            \frac{1}{S}\sum_{s} \hat g_{n,s} \hat g_{n,s}^\top & \text{mc} \\
            \nabla_f \ell_n \nabla_f \ell_n^\top & \text{empirical}
            \end{cases}

        where :math:`\hat g_{n,s} = -\nabla_f \log q(\hat y_{n,s} \mid f_n)` with would-be
        labels :math:`\hat y_{n,s} \sim q(\cdot \mid f_n)` (paper eqs. (4)-(6)).
        Backpropagating each :math:`s_k` through the net yields per-datum (would-be)
        gradients; this is the pseudo-loss trick of the paper's §2.1.

        For ``type-2`` with extra output axes (sequences), column ``k`` holds the ``k``-th
        column of every position's Hessian square root at once (positions are not separated,
        as in KFAC-expand).

        Args:
            output: Model output of the batch, ``[N, ...]``.
            y: Targets of the batch.
            kind: ``"type-2"``, ``"mc"`` or ``"empirical"``.
            mc_samples: Number of Monte-Carlo samples (``"mc"`` only).
            generator: Random generator for the samples (``"mc"`` only).

        Returns:
            The factors, ``[K, *output.shape]``.

        Raises:
            ValueError: For an unknown ``kind``.
        """
        self.require_fisher(f"output_factors(kind={kind!r})")
        kind = FactorKind(kind)
        self._check_target(output, y)
        output = output.detach()
        R = self.reduction_factor(output)
        if kind == FactorKind.EMPIRICAL:
            return (sqrt(R) * self._datum_grad(output, y)).unsqueeze(0)
        if kind == FactorKind.MC:
            return sqrt(R / mc_samples) * self._sampled_grads(output, mc_samples, generator)
        return sqrt(R) * self._hessian_sqrt(output)

    def _datum_grad(self, output: Tensor, y: Tensor) -> Tensor:
        """Per-datum gradient :math:`\\nabla_f \\ell_n`, stacked like ``output``."""
        if self.name == "MSELoss":
            return 2 * (output - y)
        if self.name == "BCEWithLogitsLoss":
            return torch.sigmoid(output) - y.to(output.dtype)
        probs = output.softmax(dim=1)
        return probs - one_hot(y, output.shape[1]).movedim(-1, 1).to(output.dtype)

    def _sampled_grads(
        self, output: Tensor, mc_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Would-be gradients for ``mc_samples`` draws of labels, ``[S, *output.shape]``."""
        shape = (mc_samples, *output.shape)
        if self.name == "MSELoss":
            eps = torch.randn(shape, generator=generator, dtype=output.dtype, device=output.device)
            return sqrt(2.0) * eps
        if self.name == "BCEWithLogitsLoss":
            p = torch.sigmoid(output)
            u = torch.rand(shape, generator=generator, dtype=output.dtype, device=output.device)
            return p - (u < p).to(output.dtype)
        C = output.shape[1]
        probs = output.softmax(dim=1)
        flat = probs.movedim(1, -1).reshape(-1, C)  # [M, C], one row per position
        # rows with NaN (from non-finite outputs) are sampled from a uniform instead (which
        # multinomial accepts); their factors stay NaN through `probs` and the operator
        # reports them (NOTE [non-finite values] in curvops.risk.finite)
        flat = torch.where(flat.isfinite().all(dim=1, keepdim=True), flat, torch.ones_like(flat))
        labels = torch.multinomial(flat, mc_samples, replacement=True, generator=generator)
        onehot = one_hot(labels.T, C).to(output.dtype)  # [S, M, C]
        onehot = onehot.reshape(mc_samples, *probs.movedim(1, -1).shape).movedim(-1, 2)
        return probs.unsqueeze(0) - onehot

    def _hessian_sqrt(self, output: Tensor) -> Tensor:
        r"""Columns of a square root of the per-datum loss Hessian, ``[K, *output.shape]``."""
        if self.name == "CrossEntropyLoss":
            C = output.shape[1]
            p = output.softmax(dim=1)
            sp = p.sqrt()
            # S = diag(sqrt p) - p sqrt(p)^T  satisfies S S^T = diag(p) - p p^T
            eye = torch.eye(C, dtype=output.dtype, device=output.device)
            shape = (C, 1, C) + (1,) * (output.ndim - 2)
            e = eye.reshape(shape)  # column index k, class index i
            return e * sp.unsqueeze(0) - p.unsqueeze(0) * sp.movedim(1, 0).unsqueeze(2)
        per_datum = output[0].numel() if output.ndim > 0 else 1
        eye = torch.eye(per_datum, dtype=output.dtype, device=output.device)
        eye = eye.reshape(per_datum, 1, *output.shape[1:]).expand(per_datum, *output.shape)
        if self.name == "MSELoss":
            return sqrt(2.0) * eye
        p = torch.sigmoid(output)
        return eye * (p * (1 - p)).sqrt().unsqueeze(0)


def _check_reduction(loss_func: nn.Module) -> str:
    reduction = getattr(loss_func, "reduction", None)
    if reduction is None:
        raise ValueError(
            f"{type(loss_func).__name__} has no `reduction` attribute. curvops needs to know "
            f"how the loss scales with the batch: set `loss_func.reduction = 'mean'` or 'sum'."
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_func).__name__} has reduction={reduction!r}; curvops needs a scalar "
            f"batch loss: use reduction='mean' or reduction='sum'."
        )
    return reduction


def make_loss_spec(loss_func: nn.Module) -> LossSpec:
    """Build the :class:`LossSpec` of a loss module.

    Args:
        loss_func: A loss module with ``reduction`` ``"mean"`` or ``"sum"``.

    Returns:
        The loss specification.

    Raises:
        TypeError: If ``loss_func`` is not callable.
        ValueError: For ``reduction="none"`` or a missing reduction.
    """
    if not callable(loss_func):
        raise TypeError(f"loss_func must be a loss module, got {type(loss_func)}.")
    reduction = _check_reduction(loss_func)
    name = type(loss_func).__name__
    supported, reason = name in SUPPORTED_FISHER_LOSSES, ""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if loss_func.weight is not None:
            supported, reason = False, " with class weights"
        elif loss_func.label_smoothing != 0.0:
            supported, reason = False, " with label smoothing"
    elif isinstance(loss_func, nn.BCEWithLogitsLoss):
        if loss_func.weight is not None or loss_func.pos_weight is not None:
            supported, reason = False, " with weight/pos_weight"
    elif name in SUPPORTED_FISHER_LOSSES and type(loss_func) not in (
        nn.MSELoss,
        nn.CrossEntropyLoss,
        nn.BCEWithLogitsLoss,
    ):
        supported, reason = False, " (a subclass of a supported loss)"
    return LossSpec(loss_func, name, reduction, supported, reason)
