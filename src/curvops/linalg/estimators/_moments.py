"""Running mean and variance of estimator samples, merged batch by batch (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvops.linalg.estimators._error_bars import student_t_factor


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

    def error(self) -> Tensor:
        """The ``error`` of the mean, :math:`(t_{0.975, n-1} / z_{0.975}) \\sqrt{s^2 / n}`.

        :math:`s^2` is the unbiased sample variance; the Student-t factor makes
        ``mean ± 2 * error`` an approximate 95% interval at small :math:`n` (NOTE [estimator
        error bars] in :mod:`curvops.linalg.estimators._error_bars`).

        Returns:
            The error (same shape as :attr:`mean`); requires two or more samples.
        """
        standard_error = torch.sqrt(self._m2 / (self.count - 1) / self.count)
        return student_t_factor(self.count - 1) * standard_error
