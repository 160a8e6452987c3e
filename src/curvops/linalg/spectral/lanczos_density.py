"""Spectral densities by stochastic Lanczos quadrature (Papyan 2020).

NOTE [Lanczos quadrature]: for a unit vector :math:`v` and symmetric
:math:`A = \\sum_i \\lambda_i q_i q_i^\\top`, the measure
:math:`\\mu_v = \\sum_i (q_i^\\top v)^2 \\delta_{\\lambda_i}` has mean
:math:`\\mathbb{E}_v[\\mu_v] = \\frac{1}{D} \\sum_i \\delta_{\\lambda_i}` (the spectral density)
for :math:`v` uniform on the sphere (a normalized Gaussian). :math:`m` Lanczos steps from
:math:`v` give the tridiagonal :math:`T_m = S \\operatorname{diag}(\\theta) S^\\top`, and the
Gauss quadrature rule with nodes :math:`\\theta_j` (Ritz values) and weights
:math:`w_j = S_{1j}^2` integrates polynomials up to degree :math:`2m - 1` exactly against
:math:`\\mu_v` (Golub & Meurant (1994). Matrices, moments and quadrature). Replacing each
delta by a Gaussian of width :math:`\\sigma` and averaging over independent start vectors
gives the smoothed density estimate of Papyan (2020). Traces of class/cross-class structure
pervade deep learning spectra. JMLR:

.. math::
    \\hat\\rho(t) = \\frac{1}{R} \\sum_{r=1}^R \\sum_{j=1}^m w_j^{(r)}
    \\frac{1}{\\sigma\\sqrt{2\\pi}} \\exp\\left(-\\frac{(t - f(\\theta_j^{(r)}))^2}
    {2\\sigma^2}\\right),

with :math:`f(\\theta) = \\theta` for the spectrum and :math:`f(\\theta) = \\log(|\\theta| +
\\epsilon)` for the spectrum of :math:`\\log(|A| + \\epsilon I)` (the same quadrature
applied to a function of :math:`A`). The grid has ``num_points`` equidistant points on the
spectral interval widened by ``margin`` times its length on both sides, and the kernel width
is :math:`\\sigma = \\kappa \\Delta t` with :math:`\\Delta t` the grid spacing. Unless
``boundaries`` are given, the interval is spanned by the extreme Ritz values of the Lanczos
runs themselves: they converge to :math:`\\lambda_{\\min}, \\lambda_{\\max}` fastest, lie
inside :math:`[\\lambda_{\\min}, \\lambda_{\\max}]` (Cauchy interlacing), and every node of the
estimate lies between them, so no extra products (and no SciPy) are needed. The density
integrates to about one (up to the kernel mass beyond the widened interval).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvops.linalg._inputs import (
    as_linear_operator,
    check_positive_float,
    check_positive_int,
    require_self_adjoint,
    require_square,
)
from curvops.linalg._sampling import Distribution, random_test_matrix
from curvops.linalg.lanczos import lanczos_tridiagonalization
from curvops.linear_operator import LinearOperator


def _check_boundaries(boundaries: object) -> tuple[float, float] | None:
    """Validate ``(lower, upper)`` spectral boundaries."""
    if boundaries is None:
        return None
    try:
        lower, upper = (float(b) for b in boundaries)
    except (TypeError, ValueError):
        raise ValueError(
            f"boundaries must be a pair (lambda_min, lambda_max) of numbers, got {boundaries!r}."
        ) from None
    if not lower < upper:
        raise ValueError(f"boundaries must satisfy lambda_min < lambda_max, got {boundaries!r}.")
    return lower, upper


def _check_grid_options(
    num_points: object, kappa: object, margin: object
) -> tuple[int, float, float]:
    """Check the grid and kernel options of the cached densities' ``__call__``.

    Args:
        num_points: Number of grid points (at least 2).
        kappa: Kernel width in units of the grid spacing (positive).
        margin: Relative widening of the interval (non-negative).

    Returns:
        ``(num_points, kappa, margin)`` as int, float, float.

    Raises:
        TypeError: If an option has the wrong type.
        ValueError: If an option is out of range.
    """
    num_points = check_positive_int(num_points, "num_points", minimum=2)
    kappa = check_positive_float(kappa, "kappa")
    margin = check_positive_float(margin, "margin", allow_zero=True)
    return num_points, kappa, margin


def _widened_grid(lower: float, upper: float, margin: float, num_points: int, like: Tensor):
    """Equidistant grid on ``[lower, upper]`` widened by ``margin`` times its length."""
    width = upper - lower
    if width <= 0:  # a single eigenvalue (e.g. A = c I): give the grid a width
        width = max(abs(lower), 1.0) * 1e-3
        lower, upper = lower - width / 2, upper + width / 2
    return torch.linspace(
        lower - margin * width,
        upper + margin * width,
        num_points,
        dtype=like.dtype,
        device=like.device,
    )


def _smoothed_density(grid: Tensor, nodes: Tensor, weights: Tensor, kappa: float) -> Tensor:
    """Average over repeats of the Gaussian-smoothed quadrature measures on ``grid``."""
    sigma = kappa * float(grid[1] - grid[0])
    z = (grid.unsqueeze(1) - nodes.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights.reshape(-1) / nodes.shape[0]


class _LanczosQuadrature:
    """Runs the Lanczos processes once and stores the quadrature nodes and weights."""

    def __init__(
        self,
        A: LinearOperator | Tensor,
        *,
        ncv: int,
        num_repeats: int = 1,
        generator: torch.Generator | None = None,
        progressbar: bool = False,
    ):
        """Run the Lanczos processes.

        Args:
            A: Symmetric operator (or dense symmetric matrix).
            ncv: Number of Lanczos steps per repeat, at most ``D``.
            num_repeats: Number of independent start vectors :math:`R`.
            generator: Random number generator of the start vectors (NOTE [estimator
                randomness] in :mod:`curvops.linalg._sampling`).
            progressbar: Whether to show a progress bar over the Lanczos steps.

        Raises:
            ValueError: If ``A`` is not square and symmetric, or an option is invalid.
        """
        A = as_linear_operator(A)
        name = type(self).__name__
        D = require_square(A, name)
        require_self_adjoint(A, name, "Spectral densities are defined for symmetric operators.")
        ncv = check_positive_int(ncv, "ncv")
        if ncv > D:
            raise ValueError(f"ncv must be at most the dimension D={D}, got {ncv}.")
        num_repeats = check_positive_int(num_repeats, "num_repeats")
        V0 = random_test_matrix(D, num_repeats, Distribution.NORMAL, generator, A.dtype, A.device)
        # one block product per step for all repeats
        H = lanczos_tridiagonalization(A, V0, ncv, generator, progressbar)
        theta, S = torch.linalg.eigh(H)
        self._ritz_values = theta  # [R, ncv]
        self._weights = S[:, 0, :] ** 2  # [R, ncv], each row sums to one

    def _bounds_or_ritz_extremes(self, boundaries: object) -> tuple[float, float]:
        """The checked ``boundaries``, or the smallest and largest Ritz value if ``None``."""
        bounds = _check_boundaries(boundaries)
        if bounds is None:
            bounds = (float(self._ritz_values.min()), float(self._ritz_values.max()))
        return bounds

    @property
    def ritz_values(self) -> Tensor:
        """The quadrature nodes (Ritz values) of every repeat, ``[num_repeats, ncv]``."""
        return self._ritz_values

    @property
    def weights(self) -> Tensor:
        """The quadrature weights of every repeat, ``[num_repeats, ncv]`` (rows sum to 1)."""
        return self._weights


class LanczosApproximateSpectrumCached(_LanczosQuadrature):
    """Spectral density estimate of Papyan (2020), evaluated repeatedly without new products.

    The constructor runs ``num_repeats`` Lanczos processes of ``ncv`` steps from normalized
    Gaussian start vectors, all at once with one block product per step; calling the
    object smooths the stored quadrature rules on a grid (NOTE [Lanczos quadrature] in
    :mod:`curvops.linalg.spectral.lanczos_density`).

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
        >>> spectrum = LanczosApproximateSpectrumCached(
        ...     A, ncv=20, num_repeats=2, generator=torch.Generator().manual_seed(0)
        ... )
        >>> grid, density = spectrum(num_points=512)
        >>> round(float(torch.trapezoid(density, grid)), 2)
        1.0
    """

    def __call__(
        self,
        *,
        num_points: int = 1024,
        kappa: float = 3.0,
        boundaries: tuple[float, float] | None = None,
        margin: float = 0.05,
    ) -> tuple[Tensor, Tensor]:
        """Evaluate the smoothed density on a grid (no products with the operator).

        Args:
            num_points: Number of grid points (at least 2).
            kappa: Kernel width in units of the grid spacing.
            boundaries: ``(lambda_min, lambda_max)`` of the spectral interval. Default: the
                extreme Ritz values.
            margin: Widening of the interval on both sides, relative to its length.

        Returns:
            The grid ``[num_points]`` and the density on it ``[num_points]``.

        Raises:
            ValueError: If an option is invalid.
        """
        num_points, kappa, margin = _check_grid_options(num_points, kappa, margin)
        bounds = self._bounds_or_ritz_extremes(boundaries)
        grid = _widened_grid(*bounds, margin, num_points, self._ritz_values)
        return grid, _smoothed_density(grid, self._ritz_values, self._weights, kappa)


class LanczosApproximateLogSpectrumCached(_LanczosQuadrature):
    """Density of the spectrum of :math:`\\log(|A| + \\epsilon I)`, re-evaluable for free.

    Same Lanczos runs as :class:`LanczosApproximateSpectrumCached`; the quadrature nodes are
    mapped through :math:`\\theta \\mapsto \\log(|\\theta| + \\epsilon)` before smoothing
    (Papyan (2020); NOTE [Lanczos quadrature] in
    :mod:`curvops.linalg.spectral.lanczos_density`).
    """

    def __call__(
        self,
        *,
        num_points: int = 1024,
        kappa: float = 3.0,
        boundaries: tuple[float, float] | None = None,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> tuple[Tensor, Tensor]:
        """Evaluate the smoothed log-spectral density on a grid (no products).

        Args:
            num_points: Number of grid points (at least 2).
            kappa: Kernel width in units of the grid spacing.
            boundaries: ``(lambda_min, lambda_max)``, bounds of the eigenvalues of ``A``
                (not of their logarithms). The log-grid spans
                :math:`[\\log(\\min|\\lambda| + \\epsilon), \\log(\\max|\\lambda| + \\epsilon)]`,
                with :math:`\\min |\\lambda| = 0` if the interval contains zero. Default: the
                extreme Ritz values.
            margin: Widening of the log-interval on both sides, relative to its length.
            epsilon: The shift :math:`\\epsilon > 0`.

        Returns:
            The grid ``[num_points]`` of :math:`\\nu = \\log(|\\lambda| + \\epsilon)` and the
            density on it ``[num_points]``.

        Raises:
            ValueError: If an option is invalid.
        """
        num_points, kappa, margin = _check_grid_options(num_points, kappa, margin)
        epsilon = check_positive_float(epsilon, "epsilon")
        lower, upper = self._bounds_or_ritz_extremes(boundaries)
        smallest = 0.0 if lower <= 0.0 <= upper else min(abs(lower), abs(upper))
        largest = max(abs(lower), abs(upper))
        log_bounds = (math.log(smallest + epsilon), math.log(largest + epsilon))
        nodes = torch.log(self._ritz_values.abs() + epsilon)
        grid = _widened_grid(*log_bounds, margin, num_points, nodes)
        return grid, _smoothed_density(grid, nodes, self._weights, kappa)


def lanczos_approximate_spectrum(
    A: LinearOperator | Tensor,
    *,
    ncv: int,
    num_repeats: int = 1,
    num_points: int = 1024,
    kappa: float = 3.0,
    boundaries: tuple[float, float] | None = None,
    margin: float = 0.05,
    generator: torch.Generator | None = None,
    progressbar: bool = False,
) -> tuple[Tensor, Tensor]:
    """Estimate the spectral density of a symmetric operator (Papyan 2020).

    Stochastic Lanczos quadrature with Gaussian smoothing (NOTE [Lanczos quadrature] in
    :mod:`curvops.linalg.spectral.lanczos_density`). Use
    :class:`LanczosApproximateSpectrumCached` to re-evaluate with other grid or kernel
    options without new products.

    Args:
        A: Symmetric operator (or dense symmetric matrix).
        ncv: Number of Lanczos steps per repeat, at most ``D``.
        num_repeats: Number of independent start vectors.
        num_points: Number of grid points.
        kappa: Kernel width in units of the grid spacing.
        boundaries: ``(lambda_min, lambda_max)``. Default: the extreme Ritz values.
        margin: Widening of the interval on both sides, relative to its length.
        generator: Random number generator of the start vectors.
        progressbar: Whether to show a progress bar over the Lanczos steps.

    Returns:
        The grid ``[num_points]`` and the density on it ``[num_points]``.
    """
    spectrum = LanczosApproximateSpectrumCached(
        A, ncv=ncv, num_repeats=num_repeats, generator=generator, progressbar=progressbar
    )
    return spectrum(num_points=num_points, kappa=kappa, boundaries=boundaries, margin=margin)


def lanczos_approximate_log_spectrum(
    A: LinearOperator | Tensor,
    *,
    ncv: int,
    num_repeats: int = 1,
    num_points: int = 1024,
    kappa: float = 3.0,
    boundaries: tuple[float, float] | None = None,
    margin: float = 0.05,
    epsilon: float = 1e-5,
    generator: torch.Generator | None = None,
    progressbar: bool = False,
) -> tuple[Tensor, Tensor]:
    """Estimate the spectral density of :math:`\\log(|A| + \\epsilon I)` (Papyan 2020).

    See :class:`LanczosApproximateLogSpectrumCached` (which re-evaluates without new
    products) and NOTE [Lanczos quadrature] in :mod:`curvops.linalg.spectral.lanczos_density`.

    Args:
        A: Symmetric operator (or dense symmetric matrix).
        ncv: Number of Lanczos steps per repeat, at most ``D``.
        num_repeats: Number of independent start vectors.
        num_points: Number of grid points.
        kappa: Kernel width in units of the grid spacing.
        boundaries: ``(lambda_min, lambda_max)`` of the eigenvalues of ``A``. Default: the
            extreme Ritz values.
        margin: Widening of the log-interval on both sides, relative to its length.
        epsilon: The shift :math:`\\epsilon > 0`.
        generator: Random number generator of the start vectors.
        progressbar: Whether to show a progress bar over the Lanczos steps.

    Returns:
        The grid ``[num_points]`` of :math:`\\log(|\\lambda| + \\epsilon)` values and the density
        on it ``[num_points]``.
    """
    spectrum = LanczosApproximateLogSpectrumCached(
        A, ncv=ncv, num_repeats=num_repeats, generator=generator, progressbar=progressbar
    )
    return spectrum(
        num_points=num_points,
        kappa=kappa,
        boundaries=boundaries,
        margin=margin,
        epsilon=epsilon,
    )
