r"""The empirical Fisher and the Monte-Carlo Fisher as linear operators.

Both are products with the GGN of a pseudo-loss whose output-space Hessian is a sum of
per-datum outer products (paper §2.1, "FVPs via GGNVPs"); the factors come from
:meth:`curvops.losses.LossSpec.output_factors`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.diagonals import DIAGONAL_MEMORY_BUDGET
from curvops.curvature.products import factor_ggn_matmat
from curvops.risk import Batch


class EFLinearOperator(CurvatureLinearOperator):
    r"""Empirical Fisher, the un-centred gradient covariance (paper eq. (6)).

    .. math::
        E = R_\mathbb{D} \sum_n \nabla_\theta \ell(f_n, y_n) \nabla_\theta \ell(f_n, y_n)^\top

    Here :math:`\ell_n` is the loss of datum :math:`n` (the leading axis of the model output
    indexes data; a datum's loss sums over its other axes). Products never form per-datum
    gradients in parameter space. Supports ``MSELoss``, ``CrossEntropyLoss`` and
    ``BCEWithLogitsLoss`` (Kunstner et al. (2019) explain how it differs from the Fisher).

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: Loss module.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group``.
    """

    is_psd = True
    _kind = "empirical"

    def __init__(self, model_func, loss_func, params, data, **kwargs):
        self._generator: torch.Generator | None = None
        self._mc_samples = 1
        # fail before any data pass if the loss has no likelihood interpretation
        from curvops.losses import make_loss_spec

        make_loss_spec(loss_func).require_fisher(type(self).__name__)
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _output_factors(self, output: Tensor, batch: Batch) -> Tensor:
        """The batch's output factors, shared by the products and :meth:`diagonal`."""
        return self._risk.loss.output_factors(
            output, batch.y, self._kind, mc_samples=self._mc_samples, generator=self._generator
        )

    def _batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        def factors(out: Tensor) -> Tensor:
            return self._output_factors(out, batch)

        def model(*p: Tensor) -> Tensor:
            return self._risk.forward(p, batch.X)

        plan = self._product_plan
        factor_ggn_matmat(model, factors, params, V, out=out, alpha=alpha, plan=plan)

    def diagonal(self, *, memory_budget: int = DIAGONAL_MEMORY_BUDGET) -> Tensor:
        r"""The exact diagonal of the matrix, flat ``[D]`` (NOTE [flattening convention]).

        .. math::
            \operatorname{diag} = \sum_\mathbb{B} w_\mathbb{B} \sum_{n \in \mathbb{B}}
            \sum_k \bigl((J_\theta f_n)^\top s_k[n]\bigr)^{\odot 2}

        the sum of squared per-datum (would-be) gradients, with the output factors
        :math:`s_k` of :meth:`curvops.losses.LossSpec.output_factors` that the products use;
        for the MC Fisher drawn from the same re-seeded generator (NOTE [MC seeding]), so it
        is the diagonal of the same matrix. Cost: about one gradient per factor column and
        output row of a datum (NOTE [exact diagonals] of
        :mod:`curvops.curvature.diagonals`). Same batching, scaling and sum across processes
        as the products.

        Args:
            memory_budget: Bytes of per-datum gradients formed at once.

        Returns:
            The diagonal, ``[D]``.

        Raises:
            ValueError: If the model output's rows do not belong to single data (e.g.
                BatchNorm in training mode).
        """

        def factors_of_batch(batch: Batch):
            # the same factors (for the MC Fisher: the same draws) as a product's pass
            return lambda output: (self._output_factors(output, batch), None)

        return self._diagonal_pass(factors_of_batch, memory_budget)

    def trace(self) -> Tensor:
        """The exact trace, the sum of :meth:`diagonal`."""
        return self.diagonal().sum()


class FisherMCLinearOperator(EFLinearOperator):
    r"""Monte-Carlo approximation of the (type-I) Fisher (paper eq. (5)).

    .. math::
        \hat F = \frac{R_\mathbb{D}}{S} \sum_n \sum_{s=1}^S \nabla_\theta \hat l_{n,s}
        \nabla_\theta \hat l_{n,s}^\top,\quad \hat y_{n,s} \sim q(y \mid f_n)

    NOTE [MC seeding]: every product re-seeds a private generator with ``seed`` (offset by
    the process rank when distributed) before its pass over the data, so the operator is a
    fixed matrix across products and the global RNG is never touched. Its expectation over
    seeds is the Fisher, which equals the GGN for the supported losses.

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        mc_samples: Number of would-be labels :math:`S` per datum.
        seed: Seed of the private generator.
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group``.

    Raises:
        ValueError: If ``mc_samples`` is not a positive integer.
    """

    _kind = "mc"

    def __init__(
        self,
        model_func,
        loss_func,
        params,
        data,
        *,
        mc_samples: int = 1,
        seed: int = 2147483647,
        **kwargs,
    ):
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        self._seed = int(seed)
        self._mc_samples_arg = mc_samples
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _before_pass(self) -> None:
        self._mc_samples = self._mc_samples_arg
        seed = self._risk.group.rank_seed(self._seed)  # NOTE [MC seeding across ranks]
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def mc_samples(self) -> int:
        """Number of Monte-Carlo samples per datum."""
        return self._mc_samples_arg
