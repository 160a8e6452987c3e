"""Figures of the tour and of ``curvops analyze`` (matplotlib, PNG files).

Figures are built with :class:`matplotlib.figure.Figure` directly (rendered by the Agg
backend), never through ``pyplot``: no global backend switch, no figure registry, nothing left
open in the caller's session. Every figure uses matplotlib's constrained layout, which makes
room for titles, axis labels, tick labels and colorbars, so that no text is clipped at the
canvas edge (tested by rendering every figure). Axes over indices get integer ticks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedFormatter,
    FixedLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)
from torch import Tensor

_DPI = 110


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float]):
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _panel_grid(
    num_panels: int,
    ncols: int,
    panel_size: tuple[float, float],
    *,
    padding: tuple[float, float] = (0.0, 0.0),
) -> tuple[Figure, list]:
    """A figure with ``num_panels`` panels in rows of ``ncols``; spare cells switched off.

    Args:
        num_panels: Number of panels.
        ncols: Panels per row (at most ``num_panels`` are used).
        panel_size: Width and height of one panel in inches.
        padding: Extra width and height of the figure in inches.

    Returns:
        The figure and its first ``num_panels`` axes, row by row.
    """
    ncols = min(ncols, num_panels)
    nrows = -(-num_panels // ncols)
    figsize = (panel_size[0] * ncols + padding[0], panel_size[1] * nrows + padding[1])
    fig, axes = _subplots(nrows, ncols, figsize)
    for ax in list(axes.flat)[num_panels:]:
        ax.axis("off")
    return fig, list(axes.flat)[:num_panels]


def _boundaries(layer_sizes: Sequence[tuple[str, int]]) -> list[int]:
    """Flat indices where a new layer begins (excluding 0 and D)."""
    return list(np.cumsum([n for _, n in layer_sizes])[:-1])


def plot_heatmaps(
    matrices: Mapping[str, Tensor],
    layer_sizes: Sequence[tuple[str, int]],
    path: Path,
    *,
    suptitle: str = "",
    ncols: int = 3,
) -> Path:
    r"""Heatmaps of square matrices side by side, white lines between layers (paper Fig. 2).

    Each panel shows :math:`\log_{10} (|A_{ij}| / \max_{kl} |A_{kl}|)`, clipped to six
    decades, so that every panel's block structure is visible at a glance on one shared
    color scale.

    Args:
        matrices: Title -> dense ``[D, D]`` matrix.
        layer_sizes: ``(layer name, number of parameters)`` in parameter order.
        path: PNG file to write.
        suptitle: Title of the figure.
        ncols: Panels per row.

    Returns:
        ``path``.
    """
    fig, axes = _panel_grid(len(matrices), ncols, (3.6, 3.7), padding=(0.8, 0.4))
    bounds = _boundaries(layer_sizes)
    image = None
    for ax, (title, M) in zip(axes, matrices.items()):
        A = np.abs(M.detach().cpu().double().numpy())
        top = A.max() if A.size and A.max() > 0 else 1.0
        image = ax.imshow(
            np.log10(np.clip(A / top, 1e-6, None)),
            cmap="magma",
            vmin=-6,
            vmax=0,
            interpolation="nearest",
        )
        for b in bounds:
            ax.axhline(b - 0.5, color="white", lw=0.6)
            ax.axvline(b - 0.5, color="white", lw=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=r"$\log_{10}(|A_{ij}| / \max |A|)$")
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


@dataclass
class DensityPanel:
    """One panel of :func:`plot_densities`.

    Attributes:
        grid: Grid of the estimated density.
        density: Estimated density on the grid.
        exact: Exact eigenvalues (shown as a normalised histogram), if known.
        xlabel: Label of the horizontal axis.
    """

    grid: Tensor
    density: Tensor
    exact: Tensor | None = None
    xlabel: str = r"eigenvalue $\lambda$"


def plot_densities(panels: Mapping[str, DensityPanel], path: Path, *, ncols: int = 2) -> Path:
    """Estimated spectral densities, one panel each, over histograms of exact eigenvalues.

    Args:
        panels: Title -> panel.
        path: PNG file to write.
        ncols: Panels per row.

    Returns:
        ``path``.
    """
    fig, axes = _panel_grid(len(panels), ncols, (5.0, 3.4))
    for ax, (title, panel) in zip(axes, panels.items()):
        dens = panel.density.detach().cpu().numpy()
        top = float(dens.max())
        if panel.exact is not None:
            counts, edges = np.histogram(panel.exact.detach().cpu().numpy(), bins=64, density=True)
            ax.stairs(counts, edges, fill=True, color="0.8", label="exact eigenvalues")
            top = max(top, float(counts.max()))
        ax.plot(panel.grid.detach().cpu().numpy(), dens, color="C0", label="Lanczos estimate")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(top * 1e-6, top * 3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return _save(fig, path)


@dataclass
class ErrorPanel:
    """One panel of :func:`plot_error_curves`.

    Attributes:
        curves: Estimator name -> ``(num_matvecs, errors)`` with errors of shape
            ``[len(num_matvecs), runs]``.
        ylabel: Label of the vertical axis.
    """

    curves: Mapping[str, tuple[Sequence[int], np.ndarray]]
    ylabel: str = "relative error"


def plot_error_curves(panels: Mapping[str, ErrorPanel], path: Path, *, ncols: int = 3) -> Path:
    """Estimator error against the number of matrix-vector products (paper Fig. 4, bottom).

    Lines show medians over the runs, bands the 25-75 percentiles.

    Args:
        panels: Title -> panel.
        path: PNG file to write.
        ncols: Panels per row.

    Returns:
        ``path``.
    """
    fig, axes = _panel_grid(len(panels), ncols, (4.6, 3.4))
    for ax, (title, panel) in zip(axes, panels.items()):
        budgets: list[int] = []
        for name, (ms, errors) in panel.curves.items():
            q25, med, q75 = np.percentile(errors, [25, 50, 75], axis=1)
            (line,) = ax.plot(ms, med, marker="o", ms=3, label=name)
            ax.fill_between(ms, q25, q75, color=line.get_color(), alpha=0.2)
            budgets = list(ms)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(budgets))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FixedFormatter([str(m) for m in budgets]))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("matrix-vector products")
        ax.set_ylabel(panel.ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_diagonal(
    diagonals: Mapping[str, Tensor],
    layer_sizes: Sequence[tuple[str, int]],
    path: Path,
    *,
    errors: Tensor | None = None,
) -> Path:
    """Diagonal entries against their flat index, with layer separators.

    Args:
        diagonals: Label -> diagonal ``[D]`` (e.g. an estimate and the exact diagonal).
        layer_sizes: ``(layer name, number of parameters)`` in parameter order.
        path: PNG file to write.
        errors: Errors ``[D]`` of the first diagonal (an estimate; Student-t widened
            standard errors, NOTE [estimator error bars]), drawn as a band of plus or minus
            two errors (about a 95% interval).

    Returns:
        ``path``.
    """
    fig, axes = _subplots(1, 1, (8, 3.4))
    ax = axes[0, 0]
    for i, (label, d) in enumerate(diagonals.items()):
        values = d.detach().cpu().double().numpy()
        (line,) = ax.plot(values, lw=0.8, label=label)
        if i == 0 and errors is not None:
            e = errors.detach().cpu().double().numpy()
            index = np.arange(len(values))
            ax.fill_between(
                index,
                values - 2 * e,
                values + 2 * e,
                color=line.get_color(),
                alpha=0.25,
                lw=0,
                label="± 2 errors (≈ 95% interval)",
            )
    for b in _boundaries(layer_sizes):
        ax.axvline(b, color="0.6", lw=0.6, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("parameter index")
    ax.set_ylabel("diagonal entry")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_eigenvalues(
    eigenvalues: Mapping[str, Tensor],
    path: Path,
    *,
    errors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Top eigenvalues (descending) against their index, one series per label.

    Args:
        eigenvalues: Label -> eigenvalues.
        path: PNG file to write.
        errors: Label -> error bars of the eigenvalues in the same order (e.g. Lanczos
            residual norms), drawn as vertical bars.

    Returns:
        ``path``.
    """
    fig, axes = _subplots(1, 1, (5, 3.4))
    ax = axes[0, 0]
    for i, (label, ev) in enumerate(eigenvalues.items()):
        values = ev.detach().cpu().double().numpy()
        order = np.argsort(values)[::-1]
        index = np.arange(1, len(values) + 1) + 0.1 * i
        bars = None
        if errors is not None and label in errors:
            bars = errors[label].detach().cpu().double().numpy()[order]
        ax.errorbar(index, values[order], yerr=bars, fmt="o", capsize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=8)
    return _save(fig, path)
