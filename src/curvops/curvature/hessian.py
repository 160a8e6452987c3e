r"""The Hessian of the empirical risk as a linear operator."""

from __future__ import annotations

from torch import Tensor

from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.products import HessianMode, hessian_matmat
from curvops.risk import Batch


class HessianLinearOperator(CurvatureLinearOperator):
    r"""Hessian :math:`\nabla^2_\theta \mathcal{L}_\mathbb{D}(\theta)` (paper eq. (2)).

    .. math::
        H = R_\mathbb{D} \sum_{n} \nabla^2_\theta \ell(f_\theta(x_n), y_n)

    Products are exact Hessian-vector products (Pearlmutter, 1994) by reverse-over-reverse or
    forward-over-reverse autodiff, whichever is faster for the model (timed at the first
    product; NOTE [product passes] of :mod:`curvops.curvature.products`). Accepts any
    twice-differentiable loss module with ``reduction`` ``"mean"`` or ``"sum"``.

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: Loss module.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group`` (see :class:`~curvops.curvature.base.CurvatureLinearOperator`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from curvops import HessianLinearOperator
        >>> model = nn.Linear(3, 2).double()
        >>> data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2).double())]
        >>> H = HessianLinearOperator(model, nn.MSELoss(), list(model.parameters()), data)
        >>> H.shape
        (8, 8)
    """

    def __init__(self, model_func, loss_func, params, data, **kwargs):
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        # reverse- or forward-over-reverse, chosen by timing both at the first product
        plan = self._product_plan
        hessian_matmat(
            lambda *p: self._risk.batch_loss(p, batch),
            params,
            V,
            mode=HessianMode.AUTO,
            plan=plan,
            out=out,
            alpha=alpha,
        )
