"""Markdown reports of the tour and of ``curvops analyze``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(x: Any) -> str:
    """Format a number compactly for a report (4 significant digits)."""
    if x is None:
        return "-"
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table.

    Args:
        headers: Column titles.
        rows: Rows of cells (numbers are formatted with :func:`fmt`).

    Returns:
        The table as Markdown.
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_NAMES = {
    "hessian": "Hessian",
    "ggn": "GGN",
    "ef": "Empirical Fisher",
    "mc": "MC Fisher",
    "kfac": "KFAC",
    "ekfac": "EKFAC",
}


def tour_report(results: dict[str, Any]) -> str:
    """The tour's ``report.md``.

    Args:
        results: The tour's results (see :func:`curvops.cli.tour.run_tour_pipeline`).

    Returns:
        The report as Markdown.
    """
    tr = results["training"]
    cfg = results["config"]
    files = results["files"]
    parts = [
        "# curvops tour",
        "",
        f"A CNN with three convolutions and one dense layer (D = {tr['num_params']} "
        f"parameters; layers {', '.join(f'{n} ({k})' for n, k in tr['layers'])}) trained for "
        f"{cfg['epochs']} epochs of Adam on {cfg['num_train']} of scikit-learn's 8x8 digits "
        f"(train accuracy {tr['train_accuracy']:.3f}, test accuracy {tr['test_accuracy']:.3f}, "
        f"final training loss {fmt(tr['final_train_loss'])}). Curvature matrices are those of "
        f"the mean cross-entropy on N = {cfg['num_curvature_data']} training images at the "
        f"trained parameters (device {results['device']}, float64, seed {results['seed']}).",
        "",
        "## Curvature matrices",
        "",
        f"![curvature matrices]({files['curvature_matrices']})",
        "",
        "White lines separate the layers; each panel shows log10(|A_ij| / max |A|) over six "
        "decades. Hessian, GGN and the Fishers are materialised from their operators with "
        "blocks of matrix-vector products; KFAC and EKFAC are block diagonal (one block per "
        "weight and bias).",
        "",
        f"![inverses]({files['inverse_matrices']})",
        "",
        "Relative residual ||A^-1 (A + damping I) - I||_F / ||I||_F of each damped inverse:",
        "",
        table(
            ["inverse", "relative residual"],
            [[k, v["relative_residual"]] for k, v in results["inverses"].items()],
        ),
        "",
        "## Eigenvalues and traces",
        "",
    ]
    rows = []
    for key, s in results["spectra"].items():
        est = results.get("trace_estimates", {}).get(key, {})
        estimate = (
            f"{fmt(est['estimate'])} ± {fmt(est['standard_error'])}" if "estimate" in est else None
        )
        rows.append(
            [
                _NAMES[key],
                s["exact_trace"],
                s.get("operator_trace"),
                estimate,
                est.get("relative_error"),
                ", ".join(fmt(v) for v in s["exact_top_eigenvalues"]),
                ", ".join(fmt(v) for v in s.get("eigsh_top_eigenvalues", [])) or "-",
                s["min_eigenvalue"],
            ]
        )
    parts += [
        table(
            [
                "matrix",
                "exact trace",
                "operator's trace()",
                "estimated trace ± error (± 2 errors ≈ 95% interval)",
                "relative error",
                "top eigenvalues (exact, eigh)",
                "top eigenvalues (eigsh on the operator)",
                "smallest eigenvalue",
            ],
            rows,
        ),
        "",
    ]
    te = results["trace_estimates"]
    any_key = next(iter(te))
    parts += [
        f"Estimated traces: Hutch++ with {te[any_key]['num_matvecs']} matrix-vector products on "
        "the operator (exact traces from the dense matrices; the operator's own `trace()` where "
        "it has a closed form, e.g. KFAC and EKFAC). Top eigenvalues by thick-restart "
        "Lanczos (`curvops.linalg.eigsh`) on the Hessian and GGN operators agree with `eigh` of "
        "the dense matrices.",
        "",
        "## Spectral densities",
        "",
        f"Stochastic Lanczos quadrature (Papyan, 2020) with {results['densities']['lanczos_steps']}"
        f" steps and {results['densities']['runs']} start vector(s) on the operators; the grey "
        "histograms are the exact eigenvalues.",
        "",
        f"![spectral densities]({files['spectral_densities']})",
        "",
        "## Trace and diagonal estimators",
        "",
        f"Relative errors over {results['estimators']['runs']} runs per budget (lines: medians, "
        "bands: 25-75 percentiles), as in the paper's Fig. 4 (bottom).",
        "",
        f"![estimator accuracy]({files['estimator_accuracy']})",
        "",
    ]
    budgets = results["estimators"]["budgets"]
    for label, key in (("trace", "median_trace_error"), ("diagonal", "median_diagonal_error")):
        rows = [
            [matrix, estimator, *errors]
            for matrix, curves in results["estimators"][key].items()
            for estimator, errors in curves.items()
        ]
        parts += [
            f"Median relative {label} error:",
            "",
            table(["matrix", "estimator", *(f"{m} products" for m in budgets)], rows),
            "",
        ]
    t = results["timings"]
    products = results.get("products", {})
    parts += [
        "## Timings",
        "",
        f"One gradient over the curvature data took {fmt(t['gradient_s'])} s; the cost of a "
        "product is also given in multiples of it (absolute times on shared machines are "
        "noise). The first product includes lazy set-up (KFAC factors, warm-up); the dense "
        "matrix is materialised with blocks of columns. The last column counts all columns the "
        "tour multiplied each operator with (materialisation, eigsh, Hutch++, Lanczos).",
        "",
        table(
            [
                "operator",
                "construct [s]",
                "first product [s]",
                "product [s]",
                "product / gradient",
                "dense [s]",
                "products (columns)",
            ],
            [
                [
                    _NAMES[k],
                    v["construct_s"],
                    v["first_matvec_s"],
                    v["matvec_s"],
                    v["matvec_s"] / t["gradient_s"],
                    v["dense_s"],
                    products.get(k),
                ]
                for k, v in t["operators"].items()
            ],
        ),
        "",
        f"Training took {fmt(tr['seconds'])} s.",
        "",
    ]
    return "\n".join(parts)


def analysis_report(results: dict[str, Any]) -> str:
    """The ``report.md`` of ``curvops analyze``.

    Args:
        results: The analysis results (see :func:`curvops.cli.analyze.run_analyze`).

    Returns:
        The report as Markdown.
    """
    a = results["analyses"]
    files = results["files"]
    name = _NAMES[results["curvature"]]
    parts = [
        f"# curvops analyze: {name}",
        "",
        table(
            ["model", "weights", "data", "loss", "D", "N", "dtype", "device", "seed"],
            [
                [
                    f"`{results['model']}`",
                    f"`{results['weights']}`" if results.get("weights") else "-",
                    f"`{results['data']}`",
                    results["loss"],
                    results["num_params"],
                    results["num_data"],
                    results["dtype"],
                    results["device"],
                    results["seed"],
                ]
            ],
        ),
        "",
    ]
    if "top-eig" in a:
        top = a["top-eig"]
        pairs = ", ".join(
            f"{fmt(v)} ± {fmt(r)}" for v, r in zip(top["eigenvalues"], top["residual_norms"])
        )
        parts += [
            "## Top eigenvalues",
            "",
            f"Thick-restart Lanczos ({top['products']} products, {fmt(top['seconds'])} s): "
            f"{pairs}.",
            "",
            "Each ± is the residual norm ||A v - λ v|| of the Ritz pair: an eigenvalue of the "
            "matrix lies within it (Parlett, 1998, Thm. 4.5.1).",
            "",
            f"![top eigenvalues]({files['top-eig']})",
            "",
        ]
    if "trace" in a:
        t = a["trace"]
        if t["exact"]:
            line = f"{fmt(t['estimate'])} (exact, from {t['method']}; {fmt(t['seconds'])} s)."
        else:
            line = (
                f"{fmt(t['estimate'])} ± {fmt(t['standard_error'])} (estimate ± error, a "
                "Student-t widened standard error: ± 2 errors is about a 95% interval; "
                f"{t['method']} with {t['num_matvecs']} products, {fmt(t['seconds'])} s)."
            )
        parts += ["## Trace", "", line, ""]
    if "diag" in a:
        d = a["diag"]
        if d["exact"]:
            line = (
                f"Exact, from {d['method']} ({fmt(d['seconds'])} s): entries from "
                f"{fmt(d['min'])} to {fmt(d['max'])}, sum {fmt(d['sum'])}."
            )
        else:
            line = (
                f"{d['method']} with {d['num_matvecs']} products ({fmt(d['seconds'])} s), "
                "estimate ± error (Student-t widened standard errors; ± 2 errors is about a "
                "95% interval): smallest entry "
                f"{fmt(d['min'])} ± {fmt(d['min_standard_error'])}, largest entry "
                f"{fmt(d['max'])} ± {fmt(d['max_standard_error'])}; the largest error "
                f"of any entry is {fmt(d['largest_standard_error'])}. The figure shows the "
                "estimate with a band of ± 2 errors."
            )
        parts += ["## Diagonal", "", line, "", f"![diagonal]({files['diag']})", ""]
    if "density" in a:
        parts += [
            "## Spectral density",
            "",
            f"{a['density']['method']} ({fmt(a['density']['seconds'])} s).",
            "",
            f"![spectral density]({files['density']})",
            "",
        ]
    return "\n".join(parts)
