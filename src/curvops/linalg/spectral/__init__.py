"""Spectral density estimation by stochastic Lanczos quadrature (Papyan 2020)."""

from curvops.linalg.spectral.lanczos_density import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)

__all__ = [
    "LanczosApproximateLogSpectrumCached",
    "LanczosApproximateSpectrumCached",
    "lanczos_approximate_log_spectrum",
    "lanczos_approximate_spectrum",
]
