"""Tests of ``curvops.linalg.spectral.lanczos_density``."""

import math

import pytest
import torch
from helpers.linalg_problems import DTYPE, counting, generator, matrix_with_spectrum

from curvops.linalg import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)

OUTLIERS = [5.0, 10.0, 15.0, 20.0, 30.0]


def _papyan_matrix(D=200):
    """A bulk of D - 5 eigenvalues in [0, 1] plus five outliers (Papyan-style spectrum)."""
    bulk = torch.rand(D - len(OUTLIERS), generator=generator(0), dtype=DTYPE)
    return matrix_with_spectrum(torch.cat([bulk, torch.tensor(OUTLIERS, dtype=DTYPE)]), seed=1)


def _mass(grid, density, low, high):
    mask = (grid >= low) & (grid <= high)
    return float(torch.trapezoid(density[mask], grid[mask]))


def test_density_mass_sits_at_the_eigenvalues():
    D = 200
    grid, density = lanczos_approximate_spectrum(
        _papyan_matrix(D), ncv=60, num_repeats=10, num_points=4096, generator=generator(2)
    )
    assert abs(_mass(grid, density, grid[0], grid[-1]) - 1) < 1e-3
    assert abs(_mass(grid, density, -0.2, 1.2) - (D - 5) / D) < 0.02
    # each outlier carries ~1/D: the weight (q^T v)^2 averaged over 10 repeats
    outlier_masses = [_mass(grid, density, x - 1, x + 1) for x in OUTLIERS]
    assert all(0.2 / D < m < 3 / D for m in outlier_masses)
    assert 0.5 * 5 / D < sum(outlier_masses) < 1.5 * 5 / D
    # nothing in the gaps
    for low, high in [(1.5, 4.0), (6.0, 9.0), (21.0, 29.0)]:
        assert _mass(grid, density, low, high) < 1e-4
    # the grid spans the (widened) extreme Ritz values
    assert grid[0] < 0.0 and 30.0 < grid[-1] < 30.0 + 0.06 * 30


def test_first_moments_are_hutchinson_estimates():
    """int t rho(t) dt = mean_r v_r^T A v_r (quadrature exactness), unbiased for tr(A)/D."""
    M = _papyan_matrix(100)
    spectrum = LanczosApproximateSpectrumCached(M, ncv=30, num_repeats=50, generator=generator(3))
    grid, density = spectrum(num_points=8192, margin=0.5)
    first = float(torch.trapezoid(grid * density, grid))
    nodes, weights = spectrum.ritz_values, spectrum.weights
    torch.testing.assert_close(weights.sum(1), torch.ones(50, dtype=DTYPE))
    per_repeat = (nodes * weights).sum(1)  # v^T A v of each normalized start vector
    assert abs(first - float(per_repeat.mean())) < 1e-6
    truth = float(torch.trace(M)) / 100
    assert abs(first - truth) < 4 * float(per_repeat.std()) / 50**0.5


def test_full_lanczos_nodes_are_the_eigenvalues():
    lam = torch.linspace(-2.0, 3.0, 12, dtype=DTYPE)
    spectrum = LanczosApproximateSpectrumCached(
        matrix_with_spectrum(lam, seed=4), ncv=12, num_repeats=3, generator=generator(5)
    )
    for nodes in spectrum.ritz_values:
        torch.testing.assert_close(nodes, lam, rtol=1e-10, atol=1e-10)


def test_cached_reevaluation_needs_no_products():
    A = counting(_papyan_matrix(80))
    spectrum = LanczosApproximateSpectrumCached(A, ncv=20, num_repeats=4, generator=generator(6))
    assert (A.num_calls, A.num_columns) == (20, 80)  # one block product per Lanczos step
    grid_a, density_a = spectrum(num_points=300, kappa=2.0)
    grid_b, density_b = spectrum(num_points=100, kappa=5.0, boundaries=(0.0, 31.0), margin=0.0)
    assert A.num_calls == 20
    assert grid_a.shape == density_a.shape == (300,) and grid_b.shape == (100,)
    assert grid_b[0] == 0.0 and grid_b[-1] == 31.0
    grid_c, density_c = lanczos_approximate_spectrum(
        A, ncv=20, num_repeats=4, num_points=300, kappa=2.0, generator=generator(6)
    )
    torch.testing.assert_close((grid_c, density_c), (grid_a, density_a))


def test_log_spectrum_mass_per_decade():
    eps = 1e-5
    small = torch.logspace(-4, -2, 190, dtype=DTYPE)
    large = torch.logspace(0, 1, 10, dtype=DTYPE)
    M = matrix_with_spectrum(torch.cat([small, large]), seed=7)
    spectrum = LanczosApproximateLogSpectrumCached(
        M, ncv=80, num_repeats=10, generator=generator(8)
    )
    grid, density = spectrum(num_points=2048, epsilon=eps)
    assert abs(_mass(grid, density, grid[0], grid[-1]) - 1) < 1e-3
    assert abs(_mass(grid, density, math.log(1e-4) - 0.5, math.log(1e-2) + 0.5) - 0.95) < 0.03
    assert abs(_mass(grid, density, -0.5, math.log(10.0) + 0.5) - 0.05) < 0.03
    assert _mass(grid, density, math.log(0.03), math.log(0.5)) < 1e-3
    # grid: [log(min Ritz + eps), log(max Ritz + eps)] widened by 5 %
    assert grid[-1] > math.log(10.0) and grid[0] > math.log(eps)
    grid_f, density_f = lanczos_approximate_log_spectrum(
        M, ncv=80, num_repeats=10, num_points=2048, epsilon=eps, generator=generator(8)
    )
    torch.testing.assert_close((grid_f, density_f), (grid, density))


def test_log_spectrum_of_indefinite_matrix_starts_at_log_epsilon():
    lam = torch.linspace(-1.0, 1.0, 30, dtype=DTYPE)
    spectrum = LanczosApproximateLogSpectrumCached(matrix_with_spectrum(lam, seed=9), ncv=30)
    grid, density = spectrum(num_points=400, epsilon=1e-3, margin=0.0)
    torch.testing.assert_close(grid[0], torch.tensor(math.log(1e-3), dtype=DTYPE))
    torch.testing.assert_close(grid[-1], torch.tensor(math.log(1.0 + 1e-3), dtype=DTYPE))
    assert (density >= 0).all()


def test_bad_inputs_raise():
    M = _papyan_matrix(20)
    with pytest.raises(ValueError, match="requires a symmetric operator"):
        lanczos_approximate_spectrum(torch.triu(M), ncv=5)
    with pytest.raises(ValueError, match="ncv must be at most the dimension D=20"):
        lanczos_approximate_spectrum(M, ncv=21)
    with pytest.raises(ValueError, match="num_repeats must be an integer >= 1"):
        lanczos_approximate_spectrum(M, ncv=5, num_repeats=0)
    spectrum = LanczosApproximateSpectrumCached(M, ncv=5)
    with pytest.raises(ValueError, match="boundaries must satisfy lambda_min < lambda_max"):
        spectrum(boundaries=(1.0, 0.0))
    with pytest.raises(ValueError, match="boundaries must be a pair"):
        spectrum(boundaries=(1.0,))
    with pytest.raises(ValueError, match="num_points must be an integer >= 2"):
        spectrum(num_points=1)
    with pytest.raises(ValueError, match="kappa must be a finite number > 0"):
        spectrum(kappa=0.0)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        spectrum(margin=-0.1)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        LanczosApproximateLogSpectrumCached(M, ncv=5)(epsilon=0.0)


def test_progressbar_runs(capsys):
    lanczos_approximate_log_spectrum(_papyan_matrix(20), ncv=5, progressbar=True)
    assert "Lanczos" in capsys.readouterr().err
