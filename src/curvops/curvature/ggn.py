r"""The generalized Gauss-Newton matrix as a linear operator."""

from __future__ import annotations

from torch import Tensor

from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.products import ggn_matmat
from curvops.risk import Batch


class GGNLinearOperator(CurvatureLinearOperator):
    r"""Generalized Gauss-Newton matrix (paper eq. (3); Schraudolph, 2002).

    .. math::
        G = R_\mathbb{D} \sum_n (J_\theta f_n)^\top \nabla^2_{f_n} \ell(f_n, y_n)
        (J_\theta f_n)

    Products use forward mode for :math:`J v`, an output-space Hessian-vector product and
    one reverse pass, vectorised over the columns of a matrix. Accepts any
    twice-differentiable loss module with ``reduction`` ``"mean"`` or ``"sum"``.

    For ``MSELoss``, ``CrossEntropyLoss`` and ``BCEWithLogitsLoss`` the loss Hessian does not
    depend on the labels, so the type-I Fisher (paper eq. (4)) and the type-II Fisher
    (Appendix B, eq. (8)) both coincide with this GGN; use this class for them. The
    Monte-Carlo approximation is :class:`~curvops.FisherMCLinearOperator`.

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: Loss module.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group`` (see :class:`~curvops.curvature.base.CurvatureLinearOperator`).
    """

    is_psd = True

    def __init__(self, model_func, loss_func, params, data, **kwargs):
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        ggn_matmat(
            lambda *p: self._risk.forward(p, batch.X),
            lambda output: self._risk.loss(output, batch.y),
            params,
            V,
            out=out,
            alpha=alpha,
            plan=self._product_plan,
        )
