r"""``MSELoss`` as a Gaussian likelihood.

Per position, :math:`\ell_{n,p} = \sum_i (f_{n,p,i} - y_{n,p,i})^2`: a Gaussian with covariance
:math:`\frac{1}{2} I`, so :math:`\nabla_f^2 \ell_{n,p} = 2 I` with square root
:math:`\sqrt{2} I`, and would-be gradients :math:`\sqrt{2}\,\varepsilon`,
:math:`\varepsilon \sim \mathcal{N}(0, I)`. The features are the last axis of the output.
"""

from __future__ import annotations

from math import sqrt

import torch
from torch import Tensor

from curvops.losses.base import ElementwiseLossSpec
from curvops.losses.likelihood import (
    LikelihoodLossSpec,
    datum_major_normal,
    identity_columns,
)


class MSELossSpec(LikelihoodLossSpec, ElementwiseLossSpec):
    """``nn.MSELoss``: normaliser = number of entries."""

    def feature_axis(self, output_ndim: int) -> int | None:  # noqa: D102
        return output_ndim - 1 if output_ndim >= 2 else None

    def term_gradients(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        return 2 * (output - y)

    def mc_noise(  # noqa: D102
        self,
        y: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        # standard normal numbers [S, *y.shape] (the output's shape), datum by datum, so
        # batching does not change the draws (NOTE [MC draw order])
        return datum_major_normal(tuple(y.shape), mc_samples, generator, dtype, device)

    def gradients_from_noise(self, output: Tensor, y: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        return sqrt(2.0) * noise

    def hessian_sqrt_columns(self, output: Tensor) -> Tensor:  # noqa: D102
        return sqrt(2.0) * identity_columns(output, self.feature_axis(output.ndim))
