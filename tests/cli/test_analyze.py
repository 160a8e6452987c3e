"""``curvops analyze``: happy paths checked against dense references, and every error path."""

import json
import sys

import pytest
import torch
from torch import nn

from curvops.cli.analyze import parse_what, run_analyses
from curvops.cli.errors import CLIError
from curvops.cli.main import main
from curvops.linear_operator import LinearOperator
from curvops.structured import TensorLinearOperator
from curvops.testing import dense_ggn, dense_hessian


def _factories_module(path):
    sys.path.insert(0, str(path.parent))
    try:
        import tiny_factories
    finally:
        sys.path.remove(str(path.parent))
    return tiny_factories


def test_analyze_ggn_matches_dense_reference(factories, tmp_path, capsys):
    # D = 23: --num-matvecs 69 gives Hutch++ a sketch of all 23 directions and XDiag one of
    # 34 >= 23, so trace and diagonal are exact up to rounding
    out = tmp_path / "analysis"
    code = main(
        [
            "analyze",
            "--model",
            f"{factories}:model",
            "--data",
            f"{factories}:classification_data",
            "--loss",
            "ce",
            "--curvature",
            "ggn",
            "--num-matvecs",
            "69",
            "--top-k",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "wrote report.md" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["num_params"] == 23 and results["num_data"] == 12

    tiny = _factories_module(factories)
    model = tiny.model()
    G = dense_ggn(
        model, nn.CrossEntropyLoss(), list(model.parameters()), tiny.classification_data()
    )
    evals = torch.linalg.eigvalsh(G).flip(0)
    a = results["analyses"]
    torch.testing.assert_close(
        torch.tensor(a["top-eig"]["eigenvalues"], dtype=torch.float64),
        evals[:3],
        rtol=1e-8,
        atol=1e-10,
    )
    assert a["trace"]["estimate"] == pytest.approx(float(G.trace()), rel=1e-8)
    assert a["diag"]["sum"] == pytest.approx(float(G.trace()), rel=1e-8)
    assert a["diag"]["max"] == pytest.approx(float(G.diagonal().max()), rel=1e-8)
    for name in ("top_eigenvalues.png", "diagonal.png", "spectral_density.png"):
        assert (out / name).stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "# curvops analyze: GGN" in report and "![spectral density]" in report


def test_analyze_hessian_mse_float32_data_is_cast(factories, tmp_path):
    out = tmp_path / "analysis"
    code = main(
        [
            "analyze",
            "--model",
            f"{factories}:model",
            "--data",
            f"{factories}:regression_data",
            "--loss",
            "mse",
            "--curvature",
            "hessian",
            "--what",
            "top-eig,trace",
            "--num-matvecs",
            "69",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["analyses"]) == {"top-eig", "trace"}
    tiny = _factories_module(factories)
    model = tiny.model()
    data = [(X.double(), y.double()) for X, y in tiny.regression_data()]
    H = dense_hessian(model, nn.MSELoss(), list(model.parameters()), data)
    assert results["analyses"]["trace"]["estimate"] == pytest.approx(float(H.trace()), rel=1e-8)
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    torch.testing.assert_close(
        torch.tensor(results["analyses"]["top-eig"]["eigenvalues"], dtype=torch.float64),
        top,
        rtol=1e-8,
        atol=1e-10,
    )
    assert not (out / "diagonal.png").exists()


def test_analyze_accepts_module_colon_factory(factories, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(factories.parent))
    code = main(
        [
            "analyze",
            "--model",
            "tiny_factories:model",
            "--data",
            "tiny_factories:classification_data",
            "--curvature",
            "ef",
            "--what",
            "trace",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0


def test_analyze_kfac_uses_its_exact_trace(factories, tmp_path):
    code = main(
        [
            "analyze",
            "--model",
            f"{factories}:model",
            "--data",
            f"{factories}:classification_data",
            "--curvature",
            "kfac",
            "--what",
            "top-eig,trace,diag",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    # KFAC is PSD: an exact diagonal has no negative entry, an estimated one none that is
    # significantly negative
    diag = results["analyses"]["diag"]
    if diag["exact"]:
        assert diag["min"] >= -1e-12
    else:
        assert diag["min"] + 6 * diag["min_standard_error"] >= 0
    evals = results["analyses"]["top-eig"]
    assert all(e >= -1e-12 for e in evals["eigenvalues"])
    # KFAC's trace is a closed form: exact, no products, no error bar
    from curvops.kronecker import KFACLinearOperator

    tiny = _factories_module(factories)
    model = tiny.model()
    K = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        tiny.classification_data(),
        fisher_type="type-2",
    )
    trace = results["analyses"]["trace"]
    assert trace["exact"] and trace["num_matvecs"] == 0 and trace["standard_error"] is None
    assert trace["estimate"] == pytest.approx(float(K.to_dense().trace()), rel=1e-10)
    assert "(exact, from KFACLinearOperator.trace();" in (tmp_path / "report.md").read_text()


def _run_error(capsys, args):
    code = main(["analyze", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("curvops analyze: error: ")
    return err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--curvature", "fisher"], "unknown curvature 'fisher'; use one of hessian|ggn"),
        (["--what", "trace,spectrum"], "unknown analysis 'spectrum' in --what"),
        (["--what", " , "], "--what is empty"),
        (["--loss", "hinge"], "unknown loss 'hinge'; use one of mse|ce|bce"),
        (["--dtype", "float16"], "unknown --dtype 'float16'"),
        (["--top-k", "0"], "--top-k must be a positive integer"),
        (["--num-matvecs", "-3"], "--num-matvecs must be a positive integer"),
        (["--lanczos-steps", "0"], "--lanczos-steps must be a positive integer"),
        (["--device", "tpu:0"], "unknown device 'tpu:0'"),
    ],
)
def test_analyze_bad_options(factories, tmp_path, capsys, extra, match):
    args = [
        "--model",
        f"{factories}:model",
        "--data",
        f"{factories}:classification_data",
        "--out",
        str(tmp_path),
    ]
    assert match in _run_error(capsys, args + extra)


def test_analyze_unavailable_cuda(factories, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = ["--model", f"{factories}:model", "--data", f"{factories}:classification_data"]
    err = _run_error(capsys, [*args, "--device", "cuda", "--out", str(tmp_path)])
    assert "not available here (no CUDA); use --device cpu" in err


@pytest.mark.parametrize(
    "model, data, match",
    [
        ("no_colon_here", "{f}:classification_data", "is not of the form MODULE:FACTORY"),
        ("{f}:", "{f}:classification_data", "is not of the form MODULE:FACTORY"),
        (
            "curvops_no_such_module:model",
            "{f}:classification_data",
            "cannot import module 'curvops_no_such_module'",
        ),
        ("{d}/missing.py:model", "{f}:classification_data", "does not exist"),
        ("{d}/raises_on_import.py:model", "{f}:classification_data", "raised ImportError"),
        ("{f}:modle", "{f}:classification_data", "has no attribute 'modle'. Available names:"),
        ("{f}:NOT_CALLABLE", "{f}:classification_data", "'NOT_CALLABLE' is a int, not callable"),
        ("{f}:raising_factory", "{f}:classification_data", "database unavailable"),
        ("{f}:needs_argument", "{f}:classification_data", "called without arguments"),
        ("{f}:not_a_model", "{f}:classification_data", "returned a dict, not a torch.nn.Module"),
        ("{f}:model", "{f}:generator_data", "returned a one-shot iterator"),
        ("{f}:model", "{f}:NUM_DATA", "is a int, not callable"),
        (
            "{f}:model",
            "{f}:augmented_data",
            "cannot build the ggn operator for this model and data: GGNLinearOperator: two "
            "evaluations",
        ),
        (
            "{f}:model",
            "{f}:wrong_label_shape_data",
            r"--loss ce needs integer class labels of shape \(12,\) for model outputs of shape "
            r"\(12, 2\); got targets of shape \(12, 1\)",
        ),
        (
            "{f}:model",
            "{f}:wrong_input_data",
            r"forward pass on the first batch \(inputs of shape \(12, 5\) \(float64\)\) raised "
            "RuntimeError",
        ),
    ],
)
def test_analyze_factory_errors(factories, tmp_path, capsys, model, data, match):
    fmt = {"f": str(factories), "d": str(factories.parent)}
    err = _run_error(
        capsys,
        [
            "--model",
            model.format(**fmt),
            "--data",
            data.format(**fmt),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "x").exists()


def test_analyze_mse_shape_misfit(factories, tmp_path, capsys):
    err = _run_error(
        capsys,
        [
            "--model",
            f"{factories}:model",
            "--data",
            f"{factories}:classification_data",
            "--loss",
            "mse",
            "--out",
            str(tmp_path),
        ],
    )
    assert "output has shape (7, 2) but the targets have shape (7,); MSELoss needs equal" in err


def test_analyze_missing_required_option(capsys):
    err = _run_error(capsys, ["--data", "x:y"])
    assert "the following arguments are required: --model" in err


def test_parse_what_keeps_order_and_drops_duplicates():
    assert [a.value for a in parse_what("trace, top-eig,trace")] == ["trace", "top-eig"]
    with pytest.raises(CLIError, match="unknown analysis 'eig'"):
        parse_what("eig")


class _ProductsOnly(LinearOperator):
    """A symmetric matrix that offers nothing but products (no trace(), no diagonal())."""

    is_self_adjoint = True

    def __init__(self, M):
        super().__init__([(M.shape[1],)], [(M.shape[0],)], dtype=M.dtype, device=M.device)
        self._M = M

    def _matmat(self, X):
        return [self._M @ X[0]]


def test_run_analyses_caps_budgets_at_the_dimension():
    # Hutch++'s capped sketch spans all 5 directions, so its trace is exact
    M = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    out = run_analyses(
        _ProductsOnly(M),
        parse_what("top-eig,trace,diag,density"),
        top_k=10,
        num_matvecs=1000,
        lanczos_steps=100,
        seed=0,
        progressbar=False,
    )
    assert out["trace"]["num_matvecs"] == 15 and out["trace"]["estimate"] == pytest.approx(15.0)
    assert not out["trace"]["exact"] and out["trace"]["standard_error"] >= 0
    assert out["diag"]["num_matvecs"] == 10 and out["_diagonal"].shape == (5,)
    assert out["_diagonal_error"].shape == (5,) and not out["diag"]["exact"]
    assert out["top-eig"]["eigenvalues"] == pytest.approx([5.0, 4.0, 3.0, 2.0])
    assert out["top-eig"]["residual_norms"] == pytest.approx([0.0] * 4, abs=1e-8)
    assert out["density"]["lanczos_steps"] == 5


def test_run_analyses_uses_exact_trace_and_diagonal_where_offered():
    # a structured operator has trace() and diagonal(): no products, no error bars
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    M = B @ B.T
    out = run_analyses(
        TensorLinearOperator(M),
        parse_what("trace,diag"),
        top_k=2,
        num_matvecs=12,
        lanczos_steps=4,
        seed=0,
        progressbar=False,
    )
    assert out["trace"]["exact"] and out["trace"]["num_matvecs"] == 0
    assert out["trace"]["estimate"] == pytest.approx(float(M.trace()), rel=1e-12)
    assert out["diag"]["exact"] and "_diagonal_error" not in out
    torch.testing.assert_close(out["_diagonal"], M.diagonal())
    assert out["_products"] == 0


def test_analyze_progress_is_clean_when_redirected(factories, tmp_path, capsys):
    # stderr captured by pytest is not a terminal, as in `curvops analyze ... 2> log`: one
    # bar with the analysis and its product count, no nested per-batch bars, whose
    # cursor-up escape sequences would end up in the log
    args = [
        "analyze",
        "--model",
        f"{factories}:model",
        "--data",
        f"{factories}:classification_data",  # two batches
        "--curvature",
        "hessian",  # estimated trace and diagonal: many products over the batches
    ]
    assert main([*args, "--what", "trace,diag", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "curvops analyze" in err and "2/2" in err
    assert "\x1b[" not in err
    assert "products)" in err


def test_analyze_report_has_an_error_bar_next_to_every_estimate(factories, tmp_path):
    from curvops.cli.report import fmt

    out = tmp_path / "analysis"
    # the Hessian has neither an exact trace nor an exact diagonal: everything is estimated
    args = ["--model", f"{factories}:model", "--data", f"{factories}:classification_data"]
    code = main(
        ["analyze", *args, "--curvature", "hessian", "--num-matvecs", "12", "--top-k", "3"]
        + ["--out", str(out), "--no-progress"]
    )
    assert code == 0
    a = json.loads((out / "results.json").read_text())["analyses"]
    report = (out / "report.md").read_text()
    assert not a["trace"]["exact"] and not a["diag"]["exact"]
    assert f"{fmt(a['trace']['estimate'])} ± {fmt(a['trace']['standard_error'])}" in report
    d = a["diag"]
    assert f"{fmt(d['min'])} ± {fmt(d['min_standard_error'])}" in report
    assert f"{fmt(d['max'])} ± {fmt(d['max_standard_error'])}" in report
    assert d["largest_standard_error"] >= max(d["min_standard_error"], d["max_standard_error"])
    top = a["top-eig"]
    for value, residual in zip(top["eigenvalues"], top["residual_norms"]):
        assert f"{fmt(value)} ± {fmt(residual)}" in report
    # the diagonal's sum is not shown for an estimate (its error is not the entries' errors)
    assert "sum" not in report.split("## Diagonal")[1].split("##")[0]


def test_analyze_figures_have_no_clipped_text_and_integer_index_ticks(
    factories, tmp_path, monkeypatch
):
    from helpers.figure_checks import record_clipping

    from curvops.cli import plots

    clipping = record_clipping(monkeypatch)
    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    args = ["--model", f"{factories}:model", "--data", f"{factories}:classification_data"]
    assert main(["analyze", *args, "--out", str(tmp_path), "--no-progress"]) == 0
    assert set(clipping) == {"top_eigenvalues.png", "diagonal.png", "spectral_density.png"}
    for name, clipped in clipping.items():
        assert clipped == [], name
    for name in ("top_eigenvalues.png", "diagonal.png"):
        (ax,) = [a for a in figures[name].axes if a.get_xlabel()]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
