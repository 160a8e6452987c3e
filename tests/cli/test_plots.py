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
