r"""The empirical Fisher and the Monte-Carlo Fisher as linear operators.

Both are products with the GGN of a pseudo-loss whose output-space Hessian is a sum of
per-datum outer products (paper §2.1, "FVPs via GGNVPs"); the factors come from
:meth:`curvops.losses.LossSpec.output_factors`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvops._integer_options import check_positive_int, check_seed
from curvops.curvature.base import CurvatureLinearOperator
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

    def _batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        def factors(out: Tensor) -> Tensor:
            return self._risk.loss.output_factors(
                out, batch.y, self._kind, mc_samples=self._mc_samples, generator=self._generator
            )

        def model(*p: Tensor) -> Tensor:
            return self._risk.forward(p, batch.X)

        plan = self._product_plan
        factor_ggn_matmat(model, factors, params, V, out=out, alpha=alpha, plan=plan)


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
        TypeError: If ``mc_samples`` or ``seed`` is not an integer.
        ValueError: If ``mc_samples`` is not positive.
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
        mc_samples = check_positive_int(mc_samples, "mc_samples")
        self._seed = check_seed(seed)
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
