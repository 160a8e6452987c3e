"""What the estimators' ``error`` means, and how it is computed (private).

NOTE [estimator error bars]: every estimator with ``return_error=True`` returns an
``error`` such that ``estimate ± 2 * error`` is a (approximately) 95% two-sided confidence
interval for the exact value (for a diagonal: entrywise), *also at small sample counts*.
``error`` is a standard error widened by a Student-t factor,

.. math::
    \\text{error} = \\frac{t_{0.975,\\,\\nu}}{z_{0.975}}\\,\\widehat{\\text{SE}},
    \\qquad z_{0.975} = 1.95996\\ldots,

with :math:`\\nu` the degrees of freedom of the standard error (number of independent
samples minus one). With many samples the factor tends to 1 and ``error`` is the ordinary
standard error; with 12 samples it is 1.12, with 4 samples 1.62. ``estimate ± 1.96 *
error`` is then the Student-t 95% interval. The interval is approximate: its coverage was
measured (below), not proven.

The standard error :math:`\\widehat{\\text{SE}}` comes from

- Hutchinson's trace estimator and the Hutchinson part of Hutch++ (samples
  :math:`x_i = v_i^\\top B v_i`): the *variance formula* of the quadratic form rather than
  the sample variance of the :math:`x_i`. The sample variance of a few skewed samples (for
  fast spectral decay, :math:`x_i` is nearly :math:`\\lambda_1 \\chi^2_1`) is small exactly
  when the mean is too small, so even a Student-t interval covers only ~88% at 12 samples.
  The formula uses the whole products :math:`B v_i`:

  .. math::
      \\operatorname{Var}(x) = \\begin{cases}
      2 (\\|B\\|_F^2 - \\sum_j B_{jj}^2) & \\text{Rademacher} \\\\
      2 \\|B\\|_F^2 & \\text{normal} \\\\
      \\frac{2D}{D + 2} (\\|B\\|_F^2 - \\operatorname{tr}(B)^2 / D) & \\text{sphere,}
      \\end{cases}

  for symmetric :math:`B` (Hutchinson (1989); for a non-symmetric :math:`B` replace
  :math:`B` by its symmetric part, whose Frobenius norm is smaller, so the formula is
  then an upper bound), with the unbiased estimates
  :math:`\\|B\\|_F^2 \\approx \\frac{1}{n}\\sum_i \\|B v_i\\|^2`,
  :math:`\\sum_j B_{jj}^2 \\approx \\frac{1}{n(n-1)} \\sum_{i \\neq k} (v_i \\odot B v_i)^\\top
  (v_k \\odot B v_k)` and :math:`\\operatorname{tr}(B)^2 \\approx \\frac{1}{n(n-1)}
  \\sum_{i \\neq k} x_i x_k`. The factor uses :math:`\\nu = n - 1`.
- XTrace and XDiag: the larger of the sample standard deviation of the :math:`m`
  exchangeable leave-one-out estimates over :math:`\\sqrt{m}` (the error estimate of
  Epperly, Tropp, Webber (2024)) and the variance formula of their Hutchinson terms; the
  former alone is too small because the estimates are positively correlated (NOTE [XTrace
  error] in :mod:`curvops.linalg.estimators.xtrace`); :math:`\\nu = m - 1`.
- ``hutchinson_squared_fro`` (samples :math:`v_i^\\top A A^\\top v_i`): the same variance
  formula with :math:`B = A A^\\top`, whose products :math:`B v_i` it computes anyway.
- ``hutchinson_squared_fro_halved`` (samples :math:`\\|A v_i\\|^2`, :math:`B = A^\\top A`):
  it has no products :math:`B v_i`, so :math:`\\|B\\|_F^2` comes from the off-diagonal
  entries of the Gram matrix :math:`(A V)^\\top (A V)`, and the larger of this formula and
  the sample variance is used. Its coverage is the weakest: 0.90-0.97 at 12 products on the
  Fig. 4 problems (0.91 for :math:`c \\geq 2`, where :math:`B` is nearly rank one and the
  samples nearly :math:`\\lambda_1^2 \\chi^2_1`); use ``hutchinson_squared_fro`` when the
  error bar matters more than the products.
- Hutchinson's diagonal estimator, whose samples are sums of many terms and nearly normal:
  the sample standard deviation of the :math:`n` samples over :math:`\\sqrt{n}`,
  :math:`\\nu = n - 1`.

Measured at 12 products on the Fig. 4 problems (:math:`D = 200`,
:math:`A = Q \\operatorname{diag}(i^{-c}) Q^\\top`, :math:`c \\in \\{0.5, 1, 2, 3\\}`),
``estimate ± 2 * error`` covers the truth in 95.4-97.1% (Hutchinson), 99.0-99.8% (Hutch++,
conservative: its factor is 1.62 at 4 samples while its variance formula is accurate),
96.1-98.0% (XTrace) of 2000 runs, and 95.4% (Hutchinson) and 96.6-98.7% (XDiag) of the
run-entry pairs of diagonals (``benchmarks/fig4_estimators.py --runs 2000 --num-matvecs 12``;
``tests/linalg/estimators/test_error_bars.py`` asserts >= 93% over 400 seeded runs), and
95-98% (``hutchinson_squared_fro``) and 91-97% (``hutchinson_squared_fro_halved``) of 1000
runs.
"""

from __future__ import annotations

from functools import cache

import torch
from scipy.stats import norm, t
from torch import Tensor

from curvops.linalg._sampling import Distribution


@cache
def student_t_factor(dof: int) -> float:
    """:math:`t_{0.975, \\nu} / z_{0.975}` (NOTE [estimator error bars]); 1 for ``dof = inf``."""
    if dof < 1:
        raise ValueError(f"a Student-t factor needs dof >= 1, got {dof}.")
    return float(t.ppf(0.975, dof) / norm.ppf(0.975))


class QuadraticFormSamples:
    """Samples :math:`x_i = v_i^\\top B v_i` with the statistics of their variance formula.

    Accumulates, batch by batch, what NOTE [estimator error bars] needs: the sums of the
    :math:`x_i` and their squares, an unbiased estimate of :math:`\\|B\\|_F^2`, and
    (Rademacher) the sums of :math:`v_i \\odot B v_i`.
    """

    def __init__(self, distribution: Distribution):
        """Start without samples.

        Args:
            distribution: Distribution of the test vectors :math:`v_i`.
        """
        self._distribution = distribution
        self.count = 0
        self._sum = self._sum_sq = self._diag_sq = 0.0
        self._fro_sum, self._fro_terms = 0.0, 0
        self._diag_sum: Tensor | float = 0.0
        self._diag_known = True
        self._gram_only = False
        self._dim = 0

    def _add(self, x: Tensor, dim: int) -> None:
        self._dim = dim
        self.count += x.numel()
        self._sum = self._sum + x.sum()
        self._sum_sq = self._sum_sq + (x**2).sum()

    def update(self, V: Tensor, BV: Tensor) -> None:
        """Add the samples of test vectors ``V`` ``[D, n]`` and their products ``B @ V``.

        :math:`\\|B v_i\\|^2` estimates :math:`\\|B\\|_F^2` (as
        :math:`\\mathbb{E}[v v^\\top] = I`).
        """
        self._add((V * BV).sum(0), V.shape[0])
        self._fro_sum = self._fro_sum + (BV**2).sum()
        self._fro_terms += V.shape[1]
        self._gram_only = False
        if self._distribution == Distribution.RADEMACHER:
            d = V * BV
            self._diag_sum = self._diag_sum + d.sum(1)
            self._diag_sq = self._diag_sq + (d**2).sum()

    def update_gram(self, AV: Tensor) -> None:
        """Add the samples :math:`x_i = \\|A v_i\\|^2` of :math:`B = A^\\top A` from ``A @ V``.

        Without the products :math:`B v_i`, :math:`\\|B\\|_F^2 = \\operatorname{tr}(B^2)`
        comes from the off-diagonal Gram entries :math:`G_{ik} = (A v_i)^\\top (A v_k) =
        v_i^\\top B v_k`, :math:`\\mathbb{E}[G_{ik}^2] = \\|B\\|_F^2` for :math:`i \\neq k` (pairs
        within a batch). The Rademacher correction :math:`\\sum_j B_{jj}^2` is then unknown and
        dropped (an upper bound of the variance), and :meth:`error` uses the sample variance
        where it is larger.
        """
        G = AV.T @ AV
        x = torch.diagonal(G)
        self._add(x, AV.shape[0])
        n = x.numel()
        self._fro_sum = self._fro_sum + (G**2).sum() - (x**2).sum()
        self._fro_terms += n * (n - 1)
        self._diag_known = False
        self._gram_only = True

    @property
    def mean(self) -> Tensor:
        """Mean of the samples, an unbiased estimate of :math:`\\operatorname{tr}(B)`."""
        return self._sum / self.count

    def error(self) -> Tensor:
        """The ``error`` of the mean (NOTE [estimator error bars]); needs two samples."""
        n, dim = self.count, self._dim
        fro = self._fro_sum / max(self._fro_terms, 1)
        if self._distribution == Distribution.RADEMACHER:
            diag_sq = 0.0
            if self._diag_known:
                diag_sq = ((self._diag_sum**2).sum() - self._diag_sq) / (n * (n - 1))
            variance = 2 * (fro - diag_sq)
        elif self._distribution == Distribution.NORMAL:
            variance = 2 * fro
        else:
            trace_sq = (self._sum**2 - self._sum_sq) / (n * (n - 1))
            variance = 2 * dim / (dim + 2) * (fro - trace_sq / dim)
        variance = torch.as_tensor(variance).clamp(min=0)
        if self._gram_only:
            # the Gram estimate of ||B||_F^2 shrinks quadratically with small samples: take the
            # sample variance where it is larger (NOTE [estimator error bars])
            sample_variance = (self._sum_sq - self._sum**2 / n) / (n - 1)
            variance = torch.maximum(variance, sample_variance)
        return student_t_factor(n - 1) * torch.sqrt(variance / n)
