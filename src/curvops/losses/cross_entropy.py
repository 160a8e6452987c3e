r"""``CrossEntropyLoss`` as a categorical likelihood per position.

The output is ``[N, C, *positions]`` (class axis 1). Per position,
:math:`\nabla_f^2 \ell = \mathrm{diag}(p) - p p^\top` with :math:`p = \mathrm{softmax}(f)`,
whose square root :math:`\mathrm{diag}(\sqrt p) - p \sqrt{p}^\top` has ``C`` columns; would-be
labels :math:`\hat y \sim \mathrm{Cat}(p)` give gradients :math:`p - e_{\hat y}`.

* ``ignore_index`` marks padding: ignored positions are no loss terms (zero factors, no
  samples drawn there) and do not count in the normaliser.
* ``label_smoothing`` :math:`\varepsilon` replaces the one-hot target by
  :math:`q = (1 - \varepsilon) e_y + \varepsilon / C`. The loss :math:`-\sum_c q_c \log p_c`
  has the same Hessian :math:`\mathrm{diag}(p) - p p^\top` (as :math:`\sum_c q_c = 1`): the
  model's likelihood is still :math:`\mathrm{Cat}(p)`, so type-2 and MC factors are unchanged,
  and the empirical Fisher uses the smoothed loss' gradient :math:`p - q`.
* Class weights ``weight=`` scale each term by :math:`w_y` and enter the normaliser; they
  have no likelihood reading, so Fisher-type quantities refuse them (the exact operators
  accept them). Class probabilities as targets are refused for Fisher types too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot

from curvops.losses.base import ClassIndexLossSpec
from curvops.losses.likelihood import LikelihoodLossSpec

# NOTE [softmax over few classes]: on CPU, PyTorch's softmax along a short contiguous last
# axis is several times slower than along a strided axis (torch 2.13, one thread: [256, 10]
# 46 µs against 8.5 µs, [1024, 10] 180 against 24; from about 100 classes on the contiguous
# kernel wins). The Fisher-type factors take a softmax per batch, which for the small
# classifiers of Laplace approximations is a visible share of a KFAC pass, so outputs
# [N, C] with few classes take the strided route (same values up to round-off).
_STRIDED_SOFTMAX_MAX_CLASSES = 32


def _strided_route(output: Tensor) -> bool:
    return (
        output.device.type == "cpu"
        and output.ndim == 2
        and output.shape[1] <= _STRIDED_SOFTMAX_MAX_CLASSES
    )


def _class_softmax(output: Tensor) -> Tensor:
    """Softmax over the class axis 1 (NOTE [softmax over few classes])."""
    if _strided_route(output):
        return output.t().softmax(dim=0).t().contiguous()
    return output.softmax(dim=1)


def loss_value(loss_func: nn.Module, output: Tensor, y: Tensor) -> Tensor:
    """``loss_func(output, y)`` without autograd, fast for a summed ``CrossEntropyLoss``.

    A plain loss (no class weights, no label smoothing, class-index targets that are all
    kept) on a few classes takes NOTE [softmax over few classes]; anything else calls
    ``loss_func`` itself, whatever its options.

    Args:
        loss_func: A ``CrossEntropyLoss`` with ``reduction="sum"`` (other losses and
            reductions are simply evaluated).
        output: Logits ``[N, C]`` (or any shape ``loss_func`` accepts).
        y: Targets.

    Returns:
        The loss, detached.
    """
    with torch.no_grad():
        plain = (
            type(loss_func) is nn.CrossEntropyLoss
            and loss_func.reduction == "sum"
            and loss_func.weight is None
            and not loss_func.label_smoothing
            and _strided_route(output)
            and not y.is_floating_point()
            and y.shape == output.shape[:1]
        )
        if plain and bool((y != loss_func.ignore_index).all()):
            log_p = output.t().log_softmax(dim=0)  # [C, N], the strided kernel
            return -log_p.gather(0, y.unsqueeze(0)).sum()
        return loss_func(output, y).detach()


class CrossEntropyLossSpec(LikelihoodLossSpec, ClassIndexLossSpec):
    """``nn.CrossEntropyLoss`` (class axis 1)."""

    def feature_axis(self, output_ndim: int) -> int | None:  # noqa: D102
        return 1

    def check_target(self, output: Tensor, y: Tensor) -> None:  # noqa: D102
        if y.dtype.is_floating_point:
            raise NotImplementedError(
                "Fisher-type quantities with CrossEntropyLoss need integer class labels; "
                "got floating-point targets (class probabilities)."
            )
        if output.ndim < 2:
            raise ValueError(
                f"CrossEntropyLoss: Fisher-type quantities need outputs [N, C, ...] with a "
                f"leading data axis, got shape {tuple(output.shape)}."
            )
        expected = (output.shape[0], *output.shape[2:])
        if tuple(y.shape) != expected:
            raise ValueError(
                f"CrossEntropyLoss: targets of shape {tuple(y.shape)} do not match outputs of "
                f"shape {tuple(output.shape)} (expected targets {expected})."
            )

    def _one_hot(self, y: Tensor, C: int, dtype: torch.dtype) -> Tensor:
        """One-hot targets ``[N, C, *]`` (zero at ignored positions)."""
        mask = y != self.loss_func.ignore_index
        safe = torch.where(mask, y, torch.zeros_like(y))
        return (one_hot(safe, C).movedim(-1, 1) * mask.unsqueeze(1)).to(dtype)

    def term_gradients(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        C = output.shape[1]
        eps = self.loss_func.label_smoothing
        if eps:
            target = (1 - eps) * self._one_hot(y, C, output.dtype) + eps / C
            return _class_softmax(output) - target
        # softmax minus the one-hot target, subtracting 1 at each kept target in place: a few
        # operations instead of a one-hot tensor's (this runs once per batch and KFAC pass)
        # (ignored positions keep the softmax: their terms are masked by the caller)
        grad = _class_softmax(output)
        keep = self.term_mask(y)
        index = (y if keep is None else torch.where(keep, y, 0)).unsqueeze(1)
        if keep is None:
            minus = torch.full((), -1.0, dtype=grad.dtype, device=grad.device).expand(index.shape)
        else:
            minus = keep.unsqueeze(1).to(grad.dtype).neg_()
        return grad.scatter_add_(1, index, minus)

    def mc_noise(  # noqa: D102
        self,
        y: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        # one uniform number per kept position and sample, drawn position by position in
        # data order (NOTE [MC draw order]): padding neither gets nor shifts draws; ignored
        # positions hold zeros. [S, *y.shape]
        keep = (y != self.loss_func.ignore_index).reshape(-1)
        kept = torch.rand(
            (int(keep.sum()), mc_samples), generator=generator, dtype=dtype, device=device
        )
        u = torch.zeros(keep.shape[0], mc_samples, dtype=dtype, device=device)
        u[keep] = kept
        return u.T.reshape(mc_samples, *y.shape)

    def gradients_from_noise(self, output: Tensor, y: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        # would-be labels by inverting each position's cumulative class distribution: the
        # number of classes whose cumulative probability is at most u (Devroye, 1986,
        # "Non-Uniform Random Variate Generation", §III.2.1), by binary search; the clamp
        # catches round-off of a last cumulative probability below u. NaN rows (from
        # non-finite outputs) give NaN gradients through the probabilities, which the
        # operator reports (NOTE [non-finite values] in curvops.risk.finite).
        C, S = output.shape[1], noise.shape[0]
        rows = _class_softmax(output).movedim(1, -1)  # [N, *positions, C]
        cumulative = rows.cumsum(dim=-1).contiguous()
        u = noise.movedim(0, -1).contiguous()  # [N, *positions, S]
        labels = torch.searchsorted(cumulative, u, right=True).clamp_(max=C - 1)
        # probabilities minus the one-hot label, [S, N, *positions, C]
        grads = rows.unsqueeze(0).repeat(S, *([1] * rows.ndim))
        minus_one = torch.full((), -1.0, dtype=grads.dtype, device=grads.device)
        index = labels.movedim(-1, 0).unsqueeze(-1)
        grads.scatter_add_(-1, index, minus_one.expand(index.shape))
        keep = (y != self.loss_func.ignore_index).unsqueeze(-1).to(output.dtype)
        return (grads * keep).movedim(-1, 2)

    def hessian_sqrt_columns(self, output: Tensor) -> Tensor:  # noqa: D102
        C = output.shape[1]
        p = _class_softmax(output)
        sp = p.sqrt()
        # S = diag(sqrt p) - p sqrt(p)^T  satisfies S S^T = diag(p) - p p^T
        eye = torch.eye(C, dtype=output.dtype, device=output.device)
        e = eye.reshape((C, 1, C) + (1,) * (output.ndim - 2))  # column index k, class index i
        return e * sp.unsqueeze(0) - p.unsqueeze(0) * sp.movedim(1, 0).unsqueeze(2)
