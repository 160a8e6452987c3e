"""``curvops tour --quick``: files, images, and numbers checked against independent references."""

import json
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from curvops.cli.main import main
from curvops.cli.models import make_digits_cnn
from curvops.cli.report import fmt
from curvops.testing import dense_ef, dense_ggn, dense_hessian

FIGURES = (
    "curvature_matrices.png",
    "inverse_matrices.png",
    "spectral_densities.png",
    "estimator_accuracy.png",
)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """Run the quick tour once; return its folder, results and the caller-state snapshots."""
    out = tmp_path_factory.mktemp("tour")
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    code = main(["tour", "--quick", "--out", str(out), "--threads", "1", "--no-progress"])
    assert code == 0
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def references(tour):
    """Dense torch.func references of the tour's matrices, rebuilt from the saved state."""
    out, _ = tour
    state = torch.load(out / "tour_state.pt")
    model = make_digits_cnn(channels=state["channels"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    params, data, loss = list(model.parameters()), [(state["X"], state["y"])], nn.CrossEntropyLoss()
    return {
        "hessian": dense_hessian(model, loss, params, data),
        "ggn": dense_ggn(model, loss, params, data),
        "ef": dense_ef(model, loss, params, data),
    }


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_nontrivial_images(tour, name):
    out, results = tour
    assert name in results["files"].values()
    image = imread(out / name)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    codes = (rgb * 255).astype(np.int64).reshape(-1, 3) @ np.array([65536, 256, 1])
    assert len(np.unique(codes)) > 50  # many colors: not a flat or two-tone image


def test_exact_traces_and_eigenvalues_match_references(tour, references):
    _, results = tour
    assert results["training"]["num_params"] == references["ggn"].shape[0]
    for key, M in references.items():
        spectrum = results["spectra"][key]
        assert spectrum["exact_trace"] == pytest.approx(float(M.trace()), rel=1e-10)
        k = len(spectrum["exact_top_eigenvalues"])
        top = torch.linalg.eigvalsh(M).flip(0)[:k]
        torch.testing.assert_close(
            torch.tensor(spectrum["exact_top_eigenvalues"], dtype=torch.float64),
            top,
            rtol=1e-9,
            atol=1e-12,
        )
    # the GGN is PSD, the trained net's Hessian is not
    assert results["spectra"]["ggn"]["min_eigenvalue"] > -1e-10
    assert results["spectra"]["hessian"]["min_eigenvalue"] < 0


def test_lanczos_top_eigenvalues_match_exact(tour):
    _, results = tour
    for key in ("hessian", "ggn"):
        s = results["spectra"][key]
        assert s["eigsh_top_eigenvalues"] == pytest.approx(s["exact_top_eigenvalues"], rel=1e-6)


def test_trace_estimates_are_consistent(tour):
    _, results = tour
    for key, est in results["trace_estimates"].items():
        exact = results["spectra"][key]["exact_trace"]
        assert est["relative_error"] == pytest.approx(abs(est["estimate"] - exact) / abs(exact))
        # Hutch++ is unbiased; its error is a few standard errors at most (fixed seed)
        assert abs(est["estimate"] - exact) <= 6 * est["standard_error"] + 1e-10


def test_inverses_invert_the_damped_matrices(tour):
    _, results = tour
    assert len(results["inverses"]) == 4
    for entry in results["inverses"].values():
        assert entry["relative_residual"] < 1e-8


def test_variance_reduction_wins_on_fast_spectral_decay(tour):
    _, results = tour
    budgets = results["estimators"]["budgets"]
    assert budgets == sorted(budgets)
    (power_law,) = [m for m in results["estimators"]["median_trace_error"] if "power law" in m]
    trace = results["estimators"]["median_trace_error"][power_law]
    diagonal = results["estimators"]["median_diagonal_error"][power_law]
    assert trace["XTrace"][-1] < 0.2 * trace["Hutchinson"][-1]
    assert trace["Hutch++"][-1] < 0.2 * trace["Hutchinson"][-1]
    assert diagonal["XDiag"][-1] < 0.2 * diagonal["Hutchinson"][-1]


def test_report_shows_the_numbers_of_results(tour):
    out, results = tour
    report = (out / "report.md").read_text()
    for figure in FIGURES:
        assert f"]({figure})" in report
    names = {"hessian": "Hessian", "ggn": "GGN", "ef": "Empirical Fisher", "mc": "MC Fisher"}
    for key, name in names.items():
        exact = fmt(results["spectra"][key]["exact_trace"])
        estimate = fmt(results["trace_estimates"][key]["estimate"])
        assert re.search(rf"\| {name} \| {re.escape(exact)} \| {re.escape(estimate)} \|", report)
    assert f"D = {results['training']['num_params']} parameters" in report


def test_tour_state_saved_for_reproduction(tour):
    out, results = tour
    state = torch.load(out / "tour_state.pt")
    assert state["X"].shape == (results["config"]["num_curvature_data"], 1, 8, 8)
