import numpy as np
import torch
from matplotlib.image import imread

from curvops.cli import plots


def _check_png(path):
    image = imread(path)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.02


def test_heatmaps(tmp_path):
    M = torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = plots.plot_heatmaps(
        {"A": M, "B": M @ M.T, "zeros": torch.zeros(7, 7)},
        [("l1", 3), ("l2", 4)],
        tmp_path / "h.png",
        suptitle="t",
        ncols=2,
    )
    _check_png(path)


def test_densities_and_error_curves(tmp_path):
    grid = torch.linspace(-1, 1, 50)
    panel = plots.DensityPanel(grid, torch.exp(-(grid**2)), torch.randn(30))
    _check_png(plots.plot_densities({"a": panel, "b": panel, "c": panel}, tmp_path / "d.png"))
    curves = {"H": ([6, 12, 24], np.random.default_rng(0).random((3, 4)))}
    _check_png(plots.plot_error_curves({"x": plots.ErrorPanel(curves)}, tmp_path / "e.png"))


def test_diagonal_and_eigenvalues(tmp_path):
    _check_png(
        plots.plot_diagonal({"d": torch.rand(20)}, [("a", 10), ("b", 10)], tmp_path / "g.png")
    )
    _check_png(plots.plot_eigenvalues({"e": torch.tensor([3.0, 2.0, 1.0])}, tmp_path / "v.png"))


def test_plots_leave_no_figures_open_in_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_eigenvalues({"e": torch.tensor([1.0, 0.5])}, tmp_path / "v.png")
    assert plt.get_fignums() == before


def _figures(monkeypatch):
    """Record every figure the plot functions save, with its clipped texts."""
    from helpers.figure_checks import clipped_texts

    saved = {}
    save = plots._save

    def keep(fig, path):
        saved[path.name] = (fig, clipped_texts(fig))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def test_no_text_is_clipped_and_index_axes_have_integer_ticks(tmp_path, monkeypatch):
    saved = _figures(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    plots.plot_heatmaps({"A": M, "B": M.T}, [("l1", 10), ("l2", 20)], tmp_path / "h.png")
    # a single density panel over a wide range with a log axis (was clipped on the left and
    # at the bottom)
    grid = torch.linspace(-50.0, 350.0, 100, dtype=torch.float64)
    panel = plots.DensityPanel(grid, torch.exp(-grid.abs() / 30), 300 * torch.rand(50))
    plots.plot_densities({"GGN: spectral density": panel}, tmp_path / "d.png")
    curves = {"H": ([6, 12, 24], np.random.default_rng(0).random((3, 4)))}
    plots.plot_error_curves({"x": plots.ErrorPanel(curves, "error")}, tmp_path / "e.png")
    d = torch.rand(1000, generator=gen)
    plots.plot_diagonal(
        {"estimate": d}, [("a", 500), ("b", 500)], tmp_path / "g.png", errors=0.1 * d
    )
    evals = torch.tensor([30.0, 20.0, 10.0, 5.0, 1.0])
    plots.plot_eigenvalues({"e": evals}, tmp_path / "v.png", errors={"e": 0.1 * evals})
    assert set(saved) == {"h.png", "d.png", "e.png", "g.png", "v.png"}
    for name, (_, clipped) in saved.items():
        assert clipped == [], name
    for name in ("g.png", "v.png"):
        (ax,) = saved[name][0].axes
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_eigenvalue_error_bars_and_diagonal_band(tmp_path, monkeypatch):
    saved = _figures(monkeypatch)
    evals = torch.tensor([1.0, 3.0, 2.0])
    errors = {"e": torch.tensor([0.1, 0.3, 0.2])}
    plots.plot_eigenvalues({"e": evals}, tmp_path / "v.png", errors=errors)
    (ax,) = saved["v.png"][0].axes
    (container,) = ax.containers
    y = container.lines[0].get_ydata()
    assert list(y) == [3.0, 2.0, 1.0]  # descending
    (bars,) = container.lines[2]
    spans = [seg[1, 1] - seg[0, 1] for seg in bars.get_segments()]
    np.testing.assert_allclose(spans, [0.6, 0.4, 0.2])  # each eigenvalue keeps its own bar
    d = torch.tensor([1.0, 2.0, 3.0])
    plots.plot_diagonal({"d": d}, [("a", 3)], tmp_path / "g.png", errors=torch.tensor([0.5] * 3))
    (ax,) = saved["g.png"][0].axes
    assert "± 2 errors (≈ 95% interval)" in [t.get_text() for t in ax.get_legend().get_texts()]
