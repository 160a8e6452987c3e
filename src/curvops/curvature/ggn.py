r"""The generalized Gauss-Newton matrix as a linear operator."""

from __future__ import annotations

from torch import Tensor

from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.compiled import compiled_ggn_matmat
from curvops.curvature.diagonals import DIAGONAL_MEMORY_BUDGET, loss_hessian_factors
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

    :meth:`diagonal` and :meth:`trace` are exact and cost about :math:`K T` gradients
    (:math:`K` the rank of a datum's loss Hessian per output row, e.g. ``C - 1`` for
    ``C`` classes; :math:`T` output rows per datum), not :math:`D` products
    (NOTE [exact diagonals] of :mod:`curvops.curvature.diagonals`).

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: Loss module.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group``, ``compile``, ``compile_options`` (see
            :class:`~curvops.curvature.base.CurvatureLinearOperator`).
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

    def _compiled_product(self):
        risk = self._risk

        def product(params, X, y, V):
            return compiled_ggn_matmat(
                lambda *p: risk.forward(p, X), lambda output: risk.loss(output, y), params, V
            )

        return product

    def _compiled_inputs(self, params: list[Tensor], batch: Batch) -> tuple:
        return (batch.X, batch.y)

    def diagonal(self, *, memory_budget: int = DIAGONAL_MEMORY_BUDGET) -> Tensor:
        r"""The exact diagonal of the GGN, flat ``[D]`` (NOTE [flattening convention]).

        .. math::
            \operatorname{diag}(G) = \sum_\mathbb{B} w_\mathbb{B} \sum_{n \in \mathbb{B}}
            \sum_k \lambda_{k,n} \bigl((J_\theta f_n)^\top v_{k,n}\bigr)^{\odot 2}

        with :math:`\nabla^2_{f_n} \mathcal{L}_\mathbb{B} = \sum_k \lambda_{k,n} v_{k,n}
        v_{k,n}^\top` the eigendecomposition of each output row's loss Hessian (found by
        autodiff, so any loss that sums per-datum terms works): one backpropagated column per
        eigenvector and output row, vectorised over the data (NOTE [exact diagonals] of
        :mod:`curvops.curvature.diagonals`). Same batching, scaling and sum across processes
        as the products.

        Args:
            memory_budget: Bytes of per-datum gradients formed at once.

        Returns:
            The diagonal, ``[D]``.

        Raises:
            ValueError: If the model output's rows do not belong to single data (e.g.
                BatchNorm in training mode) or the loss couples data.
        """
        return self._diagonal_pass(self._factors_of_batch, memory_budget)

    def _factors_of_batch(self, batch: Batch):
        """Eigen-factors of the batch's loss Hessian (for :meth:`diagonal`, ``to_dense``)."""
        return lambda output: loss_hessian_factors(lambda o: self._risk.loss(o, batch.y), output)

    def trace(self) -> Tensor:
        """The exact trace, the sum of :meth:`diagonal`."""
        return self.diagonal().sum()
