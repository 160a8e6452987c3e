"""``curvops analyze``: happy paths checked against dense references, and every error path."""

import json
import sys

import pytest
import torch
from torch import nn

from curvops.cli.analyze import parse_what, run_analyses
from curvops.cli.errors import CLIError
from curvops.cli.main import main
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


def test_analyze_kfac(factories, tmp_path):
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
            "top-eig",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    evals = json.loads((tmp_path / "results.json").read_text())["analyses"]["top-eig"]
    assert all(e >= -1e-12 for e in evals["eigenvalues"])


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


def test_run_analyses_caps_budgets_at_the_dimension():
    # Hutch++'s capped sketch spans all 5 directions, so its trace is exact
    M = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    from curvops.structured import TensorLinearOperator

    out = run_analyses(
        TensorLinearOperator(M),
        parse_what("top-eig,trace,diag,density"),
        top_k=10,
        num_matvecs=1000,
        lanczos_steps=100,
        seed=0,
        progressbar=False,
    )
    assert out["trace"]["num_matvecs"] == 15 and out["trace"]["estimate"] == pytest.approx(15.0)
    assert out["diag"]["num_matvecs"] == 10 and out["_diagonal"].shape == (5,)
    assert out["top-eig"]["eigenvalues"] == pytest.approx([5.0, 4.0, 3.0, 2.0])
    assert out["density"]["lanczos_steps"] == 5


def test_analyze_shows_a_progress_bar_on_stderr(factories, tmp_path, capsys):
    args = [
        "analyze",
        "--model",
        f"{factories}:model",
        "--data",
        f"{factories}:classification_data",
    ]
    assert main([*args, "--what", "trace", "--out", str(tmp_path)]) == 0
    assert "curvops analyze" in capsys.readouterr().err
