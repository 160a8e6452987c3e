r"""The empirical Fisher and the Monte-Carlo Fisher as linear operators.

Both are products with the GGN of a pseudo-loss whose output-space Hessian is a sum of
per-datum outer products (paper §2.1, "FVPs via GGNVPs"); the factors come from
:meth:`curvops.losses.LikelihoodLossSpec.shared_output_factors`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from math import sqrt

import torch
from torch import Tensor

from curvops._integer_options import check_positive_int, check_seed
from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.compiled import compiled_factor_ggn_matmat, gradient_factors
from curvops.curvature.diagonals import DIAGONAL_MEMORY_BUDGET
from curvops.curvature.products import factor_ggn_matmat
from curvops.risk import Batch


class GradientOf(str, Enum):
    """Whose gradients the empirical Fisher takes outer products of.

    Attributes:
        LOSS_TERM: Each loss term: one gradient per position of a datum (e.g. per token).
        DATUM: Each datum's loss, summed over its positions (e.g. per sequence).
    """

    LOSS_TERM = "loss-term"
    DATUM = "datum"


class EFLinearOperator(CurvatureLinearOperator):
    r"""Empirical Fisher, the un-centred gradient covariance (paper eq. (6)).

    .. math::
        E = R_\mathbb{D} \sum_{i} \nabla_\theta \ell_i \nabla_\theta \ell_i^\top

    where :math:`i` runs over the *loss terms* of all data (default,
    ``gradient_of="loss-term"``: one gradient per position of a datum, e.g. per token of a
    sequence; NOTE [loss terms and positions] of :mod:`curvops.losses.base`) or over the
    *data* (``gradient_of="datum"``: the gradient of a datum's loss summed over its
    positions, e.g. per sequence). Both coincide for outputs without positions (``[N, C]``,
    ``[N, D]``). The loss-term convention is the one KFAC-expand's empirical flavour
    approximates (:class:`~curvops.KFACLinearOperator`); KFAC-reduce's approximates the datum
    convention. :math:`R_\mathbb{D} = 1/Z_\mathbb{D}` for ``reduction="mean"`` (the number of
    loss terms; targets equal to ``ignore_index`` are no loss terms and contribute no
    gradient), ``1`` for ``"sum"``.

    Products never form per-datum gradients in parameter space. Supports ``MSELoss``,
    ``CrossEntropyLoss`` (also with ``ignore_index`` and ``label_smoothing``, whose gradients
    are those of the smoothed loss) and ``BCEWithLogitsLoss`` (Kunstner et al. (2019) explain
    how it differs from the Fisher).

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: Loss module.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        gradient_of: ``"loss-term"`` (default) or ``"datum"``, see above.
        **kwargs: ``progressbar``, ``check_deterministic``, ``num_data``, ``batch_size_fn``,
            ``process_group``, ``compile``, ``compile_options`` (see
            :class:`~curvops.curvature.base.CurvatureLinearOperator`; compiled products take
            the output factors from their own forward pass, NOTE [compiled products] of
            :mod:`curvops.curvature.compiled`).

    Raises:
        ValueError: For an unknown ``gradient_of``.
        NotImplementedError: For a loss without likelihood interpretation.
    """

    is_psd = True
    _kind = "empirical"

    def __init__(
        self,
        model_func,
        loss_func,
        params,
        data,
        *,
        gradient_of: str | GradientOf = GradientOf.LOSS_TERM,
        **kwargs,
    ):
        try:
            self._gradient_of = GradientOf(gradient_of)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in GradientOf)
            raise ValueError(
                f"Unknown gradient_of={gradient_of!r}; use one of {allowed}."
            ) from None
        self._generator: torch.Generator | None = None
        self._mc_samples = 1
        # fail before any data pass if the loss has no likelihood interpretation
        from curvops.losses import make_loss_spec

        make_loss_spec(loss_func).require_fisher(type(self).__name__)
        super().__init__(model_func, loss_func, params, data, **kwargs)

    @property
    def gradient_of(self) -> GradientOf:
        """Whose gradients the outer products are taken of (loss terms or data)."""
        return self._gradient_of

    def _shared_factors(self, output: Tensor, batch: Batch) -> Tensor:
        """The batch's shared output factors, for the products and :meth:`diagonal`."""
        return self._risk.loss.shared_output_factors(
            output, batch.y, self._kind, mc_samples=self._mc_samples, generator=self._generator
        )

    def _batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        loss = self._risk.loss

        def factors(out: Tensor) -> Tensor:
            return self._shared_factors(out, batch)

        def model(*p: Tensor) -> Tensor:
            return self._risk.forward(p, batch.X)

        terms = None
        if self._gradient_of == GradientOf.LOSS_TERM:
            terms = (
                lambda t: loss.to_terms(t, lead=1),
                lambda t, shape: loss.from_terms(t, shape, lead=1),
            )
        plan = self._product_plan
        factor_ggn_matmat(model, factors, params, V, terms=terms, out=out, alpha=alpha, plan=plan)

    def _compiled_product(self):
        risk, loss = self._risk, self._risk.loss
        terms = None
        if self._gradient_of == GradientOf.LOSS_TERM:
            terms = (
                lambda t: loss.to_terms(t, lead=1),
                lambda t, shape: loss.from_terms(t, shape, lead=1),
            )

        def forward(X: Tensor) -> Callable[..., Tensor]:
            return lambda *p: risk.forward(p, X)

        def empirical_product(params, X, y, scale, V):
            gradients = gradient_factors(lambda o: loss(o, y), scale)

            def factors(o: Tensor) -> Tensor:
                loss.check_target(o, y)  # (shapes: decided while tracing)
                return gradients(o)

            return compiled_factor_ggn_matmat(forward(X), factors, params, V, terms)

        def mc_product(params, X, y, scale, noise, V):
            def factors(o: Tensor) -> Tensor:
                loss.check_target(o, y)
                return scale * loss.gradients_from_noise(o, y, noise)

            return compiled_factor_ggn_matmat(forward(X), factors, params, V, terms)

        return empirical_product if self._kind == "empirical" else mc_product

    def _compiled_inputs(self, params: list[Tensor], batch: Batch) -> tuple:
        # NOTE [compiled products]: the factors come from the product's own forward pass;
        # eagerly here, only the scale (and the MC draws' random numbers, NOTE [MC noise
        # before the forward pass], in the eager products' order)
        loss = self._risk.loss
        R = loss.reduction_factor(batch.y, batch.batch_size)
        if self._kind == "empirical":
            scale = torch.tensor(R**-0.5, dtype=self.dtype, device=self.device)
            return (batch.X, batch.y, scale)
        scale = torch.tensor(sqrt(R / self._mc_samples), dtype=self.dtype, device=self.device)
        noise = loss.mc_noise(batch.y, self._mc_samples, self._generator, self.dtype, self.device)
        return (batch.X, batch.y, scale, noise)

    def diagonal(self, *, memory_budget: int = DIAGONAL_MEMORY_BUDGET) -> Tensor:
        r"""The exact diagonal of the matrix, flat ``[D]`` (NOTE [flattening convention]).

        .. math::
            \operatorname{diag} = \sum_\mathbb{B} w_\mathbb{B} \sum_{i}
            \sum_k \bigl((J_\theta f)^\top s_{k,i}\bigr)^{\odot 2}

        the sum of squared per-term or per-datum (would-be) gradients :math:`i` (as
        :attr:`gradient_of` says), with the output factors :math:`s_k` of
        :meth:`curvops.losses.LikelihoodLossSpec.shared_output_factors` that the products use,
        split into one column per position for loss terms (NOTE [output factors] of
        :mod:`curvops.losses.likelihood`); for the MC Fisher drawn from the same re-seeded
        generator (NOTE [MC seeding]), so it is the diagonal of the same matrix. Cost: about
        one gradient per column and output row of a datum (NOTE [exact diagonals] of
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
        return self._diagonal_pass(self._factors_of_batch, memory_budget)

    def _factors_of_batch(self, batch: Batch):
        """Factor columns of a batch, for :meth:`diagonal` and ``to_dense``."""
        loss = self._risk.loss
        split = self._gradient_of == GradientOf.LOSS_TERM

        # the same factors (for the MC Fisher: the same draws) as a product's pass, split
        # into one column per position for loss-term gradients (NOTE [output factors])
        def factors(output: Tensor) -> tuple[Tensor, None]:
            shared = self._shared_factors(output, batch)
            columns = loss.factor_columns(shared, split_positions=split)
            return columns(0, columns.num_columns), None

        return factors

    def trace(self) -> Tensor:
        """The exact trace, the sum of :meth:`diagonal`."""
        return self.diagonal().sum()


class FisherMCLinearOperator(EFLinearOperator):
    r"""Monte-Carlo approximation of the (type-I) Fisher (paper eq. (5)).

    .. math::
        \hat F = \frac{R_\mathbb{D}}{S} \sum_n \sum_{s=1}^S \nabla_\theta \hat l_{n,s}
        \nabla_\theta \hat l_{n,s}^\top,\quad \hat y_{n,s} \sim q(y \mid f_n)

    The would-be labels are drawn independently at every position of a datum (none at
    positions whose target is ``ignore_index``), and :math:`\hat l_{n,s}` is the datum's
    summed would-be loss; the cross-position terms vanish in expectation.

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
            ``process_group``, ``compile``, ``compile_options`` (compiled products draw the
            same labels, NOTE [MC noise before the forward pass] of
            :mod:`curvops.losses.likelihood`).

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
        if "gradient_of" in kwargs:
            raise TypeError(
                "FisherMCLinearOperator takes no gradient_of: its would-be gradients are per "
                "datum (their cross-position terms vanish in expectation)."
            )
        self._seed = check_seed(seed)
        self._mc_samples_arg = mc_samples
        super().__init__(
            model_func, loss_func, params, data, gradient_of=GradientOf.DATUM, **kwargs
        )

    def _before_pass(self) -> None:
        self._mc_samples = self._mc_samples_arg
        seed = self._risk.group.rank_seed(self._seed)  # NOTE [MC seeding across ranks]
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def mc_samples(self) -> int:
        """Number of Monte-Carlo samples per datum."""
        return self._mc_samples_arg
