"""Running mean and variance of estimator samples, merged batch by batch (private)."""

from __future__ import annotations

import torch
from torch import Tensor


class RunningMoments:
    """Mean and sample variance of samples that arrive in batches along the last axis.

    Batches are merged with the pairwise update of Chan, Golub, LeVeque (1979). Updating
    formulae and a pairwise algorithm for computing sample variances, which avoids the
    cancellation of the naive sum-of-squares formula.
    """

    def __init__(self):
        """Start without samples."""
        self.count = 0
        self.mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, samples: Tensor) -> None:
        """Add a batch of samples ``[..., n]``."""
        n = samples.shape[-1]
        batch_mean = samples.mean(dim=-1)
        batch_m2 = ((samples - batch_mean.unsqueeze(-1)) ** 2).sum(dim=-1)
        if self.count == 0:
            self.count, self.mean, self._m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self._m2 = self._m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def standard_error(self) -> Tensor:
        """Standard error of the mean, :math:`\\sqrt{s^2 / n}` with the unbiased :math:`s^2`.

        Returns:
            The standard error (same shape as :attr:`mean`); requires two or more samples.
        """
        return torch.sqrt(self._m2 / (self.count - 1) / self.count)

    def result(self, return_error: bool) -> Tensor | tuple[Tensor, Tensor]:
        """The mean, and with ``return_error`` also its standard error (what estimators return).

        Args:
            return_error: Whether to also return :meth:`standard_error`.

        Returns:
            :attr:`mean`, or ``(mean, standard_error)``.
        """
        if return_error:
            return self.mean, self.standard_error()
        return self.mean
