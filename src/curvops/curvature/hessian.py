r"""The Hessian of the empirical risk as a linear operator."""

from __future__ import annotations

from torch import Tensor

from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.compiled import compiled_hessian_matmat
from curvops.curvature.products import HessianMode, hessian_matmat
from curvops.risk import Batch


class HessianLinearOperator(CurvatureLinearOperator):
    r"""Hessian :math:`\nabla^2_\theta \mathcal{L}_\mathbb{D}(\theta)` (paper eq. (2)).

    .. math::
        H = R_\mathbb{D} \sum_{n} \nabla^2_\theta \ell(f_\theta(x_n), y_n)

    Products are exact Hessian-vector products (Pearlmutter, 1994) by reverse-over-reverse
    autodiff (a gradient with its graph, then one backward pass per column) or by
    forward-over-reverse (dual tensors through the gradient computation) (NOTE [product
    passes] of :mod:`curvops.curvature.products`; Dagréou et al., 2024). By default the mode
    follows from the operations the model calls, decided once per operator at its first
    product: forward-over-reverse for models with max-pooling and no normalisation or
    attention, reverse-over-reverse otherwise (NOTE [Hessian mode by model]); the choice is
    in ``H.hessian_mode`` afterwards.
    Accepts any twice-differentiable loss module with ``reduction`` ``"mean"`` or ``"sum"``.

    The Hessian has no exact :meth:`diagonal` or :meth:`trace` (per-datum factors of the
    Hessian do not exist in general; the exact diagonal takes :math:`D` products): estimate
    them matrix-free with :func:`~curvops.hutchinson_diag` / :func:`~curvops.xdiag` and
    :func:`~curvops.hutchinson_trace` / :func:`~curvops.hutchpp_trace` /
    :func:`~curvops.xtrace`, or take the exact diagonal of the positive semi-definite
    Gauss-Newton approximation, :meth:`curvops.GGNLinearOperator.diagonal`.

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: Loss module.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        mode: ``"by-model"`` (default: the rule above, the same in every process),
            ``"reverse-over-reverse"``, ``"forward-over-reverse"``, or ``"auto"``: time both
            on the first batch of the first product and keep the faster one (then products of
            two operator instances may differ by round-off, as the choice depends on timing).
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group``, ``compile``, ``compile_options`` (see
            :class:`~curvops.curvature.base.CurvatureLinearOperator`). With ``compile=True``
            products are forward-over-reverse whatever ``mode`` says (NOTE [compiled
            products] of :mod:`curvops.curvature.compiled`).

    Raises:
        ValueError: For an unknown ``mode``.

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

    def __init__(
        self,
        model_func,
        loss_func,
        params,
        data,
        *,
        mode: str | HessianMode = HessianMode.BY_MODEL,
        **kwargs,
    ):
        try:
            self._mode = HessianMode(mode)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in HessianMode)
            raise ValueError(f"Unknown Hessian mode {mode!r}; use one of {allowed}.") from None
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        plan = self._product_plan  # where "by-model" and "auto" keep their choice
        hessian_matmat(
            lambda *p: self._risk.batch_loss(p, batch),
            params,
            V,
            mode=self._mode,
            plan=plan,
            out=out,
            alpha=alpha,
        )

    @property
    def hessian_mode(self) -> HessianMode | None:
        """The mode products use (``None`` before the first product of a deciding mode).

        The explicit ``mode``, or the one that ``"by-model"`` or ``"auto"`` chose; always
        forward-over-reverse with ``compile=True`` (NOTE [compiled products]).
        """
        if self._compile_options is not None:
            return HessianMode.FORWARD_OVER_REVERSE
        if self._mode in (HessianMode.AUTO, HessianMode.BY_MODEL):
            return self._product_plan.hessian_mode
        return self._mode

    def _compiled_product(self):
        risk = self._risk

        def product(params, X, y, V):
            return compiled_hessian_matmat(lambda *p: risk.loss(risk.forward(p, X), y), params, V)

        return product

    def _compiled_inputs(self, params: list[Tensor], batch: Batch) -> tuple:
        return (batch.X, batch.y)

    def diagonal(self) -> Tensor:
        """Not available for the Hessian: raises an error naming the alternatives.

        Raises:
            NotImplementedError: Always (see the class docstring).
        """
        raise NotImplementedError(
            "HessianLinearOperator has no exact diagonal (it would take D Hessian-vector "
            "products). Estimate it with curvops.hutchinson_diag(H, num_matvecs) or "
            "curvops.xdiag(H, num_matvecs), or use GGNLinearOperator(...).diagonal(), the exact "
            "diagonal of the positive semi-definite Gauss-Newton approximation."
        )

    def trace(self) -> Tensor:
        """Not available for the Hessian: raises an error naming the alternatives.

        Raises:
            NotImplementedError: Always (see the class docstring).
        """
        raise NotImplementedError(
            "HessianLinearOperator has no exact trace (it would take D Hessian-vector "
            "products). Estimate it with curvops.hutchinson_trace, curvops.hutchpp_trace or "
            "curvops.xtrace (H, num_matvecs), or use GGNLinearOperator(...).trace(), the exact "
            "trace of the positive semi-definite Gauss-Newton approximation."
        )
