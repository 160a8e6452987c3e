"""``curvops tour --quick``: files, images, and numbers checked against independent references."""

import collections
import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from helpers.figure_checks import record_clipping
from matplotlib.image import imread
from torch import nn

from curvops.cli.main import build_parser, main
from curvops.cli.models import make_digits_cnn
from curvops.cli.report import fmt
from curvops.testing import dense_ef, dense_ggn, dense_hessian

FIGURES = (
    "curvature_matrices.png",
    "inverse_matrices.png",
    "spectral_densities.png",
    "estimator_accuracy.png",
)


WORK = {}  # what the quick tour computed, counted independently of its own bookkeeping


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """Run the quick tour once; return its folder and results.

    Checks the caller-state snapshots, and records (in ``WORK``) the columns every
    data-passing operator is multiplied with, how often a dense matrix is checked for
    symmetry, and the progress output (stderr redirected to a non-terminal stream).
    """
    from curvops.curvature.base import CurvatureLinearOperator
    from curvops.structured import _dense_linalg, tensor

    columns = collections.Counter()
    symmetry_checks = []
    matmat = CurvatureLinearOperator._matmat

    def counting_matmat(self, X):
        columns[type(self).__name__] += X[0].shape[-1]
        return matmat(self, X)

    def counting_is_symmetric(M):
        symmetry_checks.append(M.shape)
        return _dense_linalg.is_symmetric(M)

    out = tmp_path_factory.mktemp("tour")
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(CurvatureLinearOperator, "_matmat", counting_matmat)
        mp.setattr(tensor, "is_symmetric", counting_is_symmetric)
        clipping = record_clipping(mp)
        code = main(["tour", "--quick", "--out", str(out), "--threads", "1"])
    assert code == 0
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    WORK.update(
        columns=dict(columns),
        symmetry_checks=len(symmetry_checks),
        err=err.getvalue(),
        clipping=clipping,
    )
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


def test_figures_have_no_clipped_text(tour):
    assert set(WORK["clipping"]) == set(FIGURES)
    for name, clipped in WORK["clipping"].items():
        assert clipped == [], name


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
    names = {
        "hessian": "Hessian",
        "ggn": "GGN",
        "ef": "Empirical Fisher",
        "mc": "MC Fisher",
        "kfac": "KFAC",
        "ekfac": "EKFAC",
    }
    for key, name in names.items():
        exact = fmt(results["spectra"][key]["exact_trace"])
        own = fmt(results["spectra"][key].get("operator_trace"))
        estimate = fmt(results["trace_estimates"][key]["estimate"])
        error = fmt(results["trace_estimates"][key]["standard_error"])
        cells = [name, exact, own, f"{estimate} ± {error}"]
        assert re.search(r"\| " + r" \| ".join(map(re.escape, cells)) + r" \|", report), key
    # KFAC and EKFAC offer their exact trace in closed form; it equals the dense trace
    for key in ("kfac", "ekfac"):
        spectrum = results["spectra"][key]
        assert spectrum["operator_trace"] == pytest.approx(spectrum["exact_trace"], rel=1e-10)
    assert f"D = {results['training']['num_params']} parameters" in report


def test_tour_state_saved_for_reproduction(tour):
    out, results = tour
    state = torch.load(out / "tour_state.pt")
    assert state["X"].shape == (results["config"]["num_curvature_data"], 1, 8, 8)


def test_quick_tour_work_is_bounded(tour):
    # the expensive work is products with the four data-passing operators: each is
    # materialised once (D columns) plus the matrix-free analyses: two timed products and
    # Hutch++ on all four, eigsh and two Lanczos densities on Hessian and GGN; counted by
    # patching their product
    _, results = tour
    D, cfg = results["training"]["num_params"], results["config"]
    names = {
        "hessian": "HessianLinearOperator",
        "ggn": "GGNLinearOperator",
        "ef": "EFLinearOperator",
        "mc": "FisherMCLinearOperator",
    }
    assert set(WORK["columns"]) == set(names.values())
    everywhere = D + 2 + cfg["trace_matvecs"]
    densities = 2 * cfg["lanczos_steps"] * cfg["lanczos_runs"]
    operators = results["timings"]["operators"]
    for key, cls in names.items():
        columns = WORK["columns"][cls]
        counted = results["products"][key]  # the tour's own count, shown in the report
        if operators[key]["dense_method"] == "to_dense()":
            # an operator that materialises itself does so outside the tour's count, with
            # at most D columns
            assert counted <= columns <= counted + D, key
            matrix_free = counted - (everywhere - D)
        else:
            assert operators[key]["dense_method"] == "blocks of 82 columns"
            assert counted == columns, key
            matrix_free = counted - everywhere
        if key in ("ef", "mc"):
            assert matrix_free == 0, key
        else:
            eigsh = matrix_free - densities
            assert 0 < eigsh <= 5 * 20, (key, eigsh)  # at most 5 restart cycles of 20 vectors
    assert sum(WORK["columns"].values()) <= 4 * everywhere + 2 * (densities + 100)
    # dense matrices are wrapped once, not checked for symmetry in every estimator call
    # (each check of a D x D matrix costs more than a small estimate)
    assert WORK["symmetry_checks"] <= 10


def test_progress_counts_every_step(tour):
    # one bar whose total (counted up front) is reached exactly, with labels naming the
    # current step, and no escape sequences when stderr is not a terminal
    from curvops.cli.tour import QUICK, count_steps

    _, results = tour
    steps = count_steps(QUICK)
    assert results["steps"] == steps
    assert steps["train"] == QUICK.epochs and steps["operators"] == 4 * (1 + 4) + 2 + 1
    total = sum(steps.values())
    err = WORK["err"]
    assert f"{total}/{total}" in err and f"{total + 1}/{total}" not in err
    own = results["timings"]["operators"]["hessian"]["dense_method"] == "to_dense()"
    assert f"operators: Hessian dense {'1/1' if own else '4/4'}" in err and "train: epoch" in err
    assert "\x1b[" not in err


def test_tour_runs_single_threaded_by_default():
    parser = build_parser()
    assert parser.parse_args(["tour"]).threads == 1
    assert parser.parse_args(["analyze", "--model", "m:f", "--data", "d:f"]).threads is None
