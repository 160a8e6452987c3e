r"""``BCEWithLogitsLoss`` as a Bernoulli likelihood per entry.

:math:`\nabla_f^2 \ell = \mathrm{diag}(\sigma(f) (1 - \sigma(f)))`; would-be labels
:math:`\hat y \sim \mathrm{Bernoulli}(\sigma(f))` give gradients :math:`\sigma(f) - \hat y`.
The features of a loss term are the last axis of the output. ``weight`` and ``pos_weight``
have no likelihood reading: Fisher-type quantities refuse them (the exact operators accept
them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.losses.base import ElementwiseLossSpec
from curvops.losses.likelihood import (
    LikelihoodLossSpec,
    datum_major_uniform,
    identity_columns,
)


class BCEWithLogitsLossSpec(LikelihoodLossSpec, ElementwiseLossSpec):
    """``nn.BCEWithLogitsLoss``: normaliser = number of entries (weights do not enter it)."""

    def feature_axis(self, output_ndim: int) -> int | None:  # noqa: D102
        return output_ndim - 1 if output_ndim >= 2 else None

    def term_gradients(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        return torch.sigmoid(output) - y.to(output.dtype)

    def mc_noise(  # noqa: D102
        self,
        y: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        # one uniform number per entry and sample, [S, *y.shape] (the output's shape),
        # datum by datum, so batching does not change the draws (NOTE [MC draw order])
        return datum_major_uniform(tuple(y.shape), mc_samples, generator, dtype, device)[..., 0]

    def gradients_from_noise(self, output: Tensor, y: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        p = torch.sigmoid(output)
        return p - (noise < p).to(output.dtype)  # would-be label 1 with probability p

    def hessian_sqrt_columns(self, output: Tensor) -> Tensor:  # noqa: D102
        p = torch.sigmoid(output)
        return identity_columns(output, self.feature_axis(output.ndim)) * (p * (1 - p)).sqrt()
