"""``curvops analyze``: curvature analysis of a user's model and data factories.

Imports ``--model`` and ``--data`` factories, checks that model, data and loss fit (a probe
forward pass), builds the requested curvature operator and runs the requested analyses:

* ``top-eig``: the largest eigenvalues by thick-restart Lanczos (:func:`curvops.linalg.eigsh`),
  each with its residual norm (a bound on its error);
* ``trace``: the operator's exact ``trace()`` where it has one (KFAC, EKFAC), else Hutch++
  (Meyer et al. (2021)) with an error (a Student-t widened standard error);
* ``diag``: the operator's exact ``diagonal()`` where it has one, else XDiag (Epperly, Tropp,
  Webber (2024)) with entrywise errors;
* ``density``: the spectral density by stochastic Lanczos quadrature (Papyan (2020)).

The model comes from a factory or a saved file, with trained weights from a state-dict file
(NOTE [loading checkpoints safely] in :mod:`curvops.cli.checkpoints`).

It writes ``report.md``, ``results.json`` and one figure per analysis into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from curvops.cli.curvatures import TITLES, Curvature, build_curvature, parse_curvature
from curvops.cli.device import resolve_device
from curvops.cli.errors import CLIError
from curvops.cli.exact import exact_diagonal, exact_trace
from curvops.cli.models import layer_sizes
from curvops.cli.progress import CountedOperator, StepBar, is_interactive
from curvops.cli.timing import timed
from curvops.cli.user_setup import prepare
from curvops.curvature import NonDeterministicError
from curvops.linear_operator import LinearOperator


class Analysis(str, Enum):
    """Analyses of the ``--what`` option."""

    TOP_EIG = "top-eig"
    TRACE = "trace"
    DIAG = "diag"
    DENSITY = "density"


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_what(what: str) -> list[Analysis]:
    """Parse the comma-separated ``--what`` option.

    Args:
        what: E.g. ``"top-eig,trace"``.

    Returns:
        The analyses, in the given order, without duplicates.

    Raises:
        CLIError: For an empty list or an unknown analysis.
    """
    names = [w.strip() for w in what.split(",") if w.strip()]
    allowed = ",".join(a.value for a in Analysis)
    if not names:
        raise CLIError(f"--what is empty; pass a comma-separated subset of {allowed}.")
    out: list[Analysis] = []
    for name in names:
        try:
            analysis = Analysis(name)
        except ValueError:
            raise CLIError(
                f"unknown analysis {name!r} in --what; use a comma-separated subset of {allowed}."
            ) from None
        if analysis not in out:
            out.append(analysis)
    return out


def _parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CLIError(f"unknown --dtype {name!r}; use float32 or float64.")
    return _DTYPES[name]


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise CLIError(f"{option} must be a positive integer, got {value}.")
    return value


def _round_down(value: int, multiple: int, minimum: int) -> int:
    return max(minimum, value - value % multiple)


def _top_eigenvalues(A: LinearOperator, k: int, gen: torch.Generator) -> dict[str, Any]:
    r"""Top eigenvalues by Lanczos, each with the residual norm of its Ritz pair.

    For a symmetric :math:`A` and a unit vector :math:`v`, some eigenvalue of :math:`A` lies
    within :math:`\|A v - \theta v\|` of :math:`\theta` (Parlett (1998). The Symmetric
    Eigenvalue Problem, Thm. 4.5.1): the residual norm is a rigorous error bar. It costs
    one product with the ``k`` eigenvectors.
    """
    from curvops.linalg import eigsh

    evals, evecs = eigsh(A, k=k, which="LA", generator=gen)
    residuals = torch.linalg.vector_norm(A @ evecs - evecs * evals, dim=0)
    return {
        "eigenvalues": evals.flip(0).tolist(),
        "residual_norms": residuals.flip(0).tolist(),
    }


def run_analyses(
    A: LinearOperator,
    what: list[Analysis],
    *,
    top_k: int,
    num_matvecs: int,
    lanczos_steps: int,
    seed: int,
    progressbar: bool,
) -> dict[str, Any]:
    """Run the analyses on an operator.

    Trace and diagonal are exact where the operator offers them (e.g. KFAC's closed-form
    trace, a structured operator's diagonal; :mod:`curvops.cli.exact`), and estimated
    otherwise, with an error estimate next to every estimated number: Hutch++'s error,
    XDiag's entrywise errors (Student-t widened standard errors, NOTE [estimator error
    bars]), and the residual norm of every Lanczos
    eigenvalue (a rigorous bound on its distance to an eigenvalue).

    Args:
        A: A symmetric curvature operator.
        what: The analyses.
        top_k: Number of top eigenvalues.
        num_matvecs: Products per trace or diagonal estimate (rounded down to what the
            estimator needs, and capped by the dimension).
        lanczos_steps: Lanczos steps of the spectral density (capped by the dimension).
        seed: Seed of the CPU generator of every random vector.
        progressbar: Show a progress bar over the analyses, with the number of products
            so far (NOTE [command-line progress] in :mod:`curvops.cli.progress`).

    Returns:
        Analysis name -> its numbers; tensors for plotting are kept under the keys
        ``"_diagonal"``, ``"_diagonal_error"`` (estimates only) and ``"_density"``, and the
        number of product columns of all analyses under ``"_products"``.
    """
    from curvops.linalg import hutchpp_trace, lanczos_approximate_spectrum, xdiag

    D = A.shape[1]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    bar = StepBar(len(what), "curvops analyze", enabled=progressbar)
    label = ""

    def show(columns: int) -> None:
        bar.label(f"{label} ({counted.columns} products)")

    counted = CountedOperator(A, show)

    def top_eig() -> None:
        before = counted.columns
        result, seconds = timed(_top_eigenvalues, A.device, counted, min(top_k, D - 1), gen)
        out["top-eig"] = {**result, "products": counted.columns - before, "seconds": seconds}

    def trace() -> None:
        exact, seconds = timed(exact_trace, A.device, A)
        if exact is not None:
            out["trace"] = {
                "method": f"{type(A).__name__}.trace()",
                "exact": True,
                "estimate": float(exact),
                "standard_error": None,
                "num_matvecs": 0,
                "seconds": seconds,
            }
            return
        m = min(_round_down(num_matvecs, 3, 6), 3 * D)
        (estimate, error), seconds = timed(
            hutchpp_trace, A.device, counted, m, generator=gen, return_error=True
        )
        out["trace"] = {
            "method": "Hutch++",
            "exact": False,
            "estimate": float(estimate),
            "standard_error": float(error),
            "num_matvecs": m,
            "seconds": seconds,
        }

    def diag() -> None:
        diagonal, seconds = timed(exact_diagonal, A.device, A)
        if diagonal is not None:
            errors, method, m = None, f"{type(A).__name__}.diagonal()", 0
        else:
            m = min(_round_down(num_matvecs, 2, 4), 2 * D)
            (diagonal, errors), seconds = timed(
                xdiag, A.device, counted, m, generator=gen, return_error=True
            )
            method = "XDiag"
        lo, hi = int(diagonal.argmin()), int(diagonal.argmax())
        out["diag"] = {
            "method": method,
            "exact": errors is None,
            "num_matvecs": m,
            "seconds": seconds,
            "sum": float(diagonal.sum()),
            "min": float(diagonal[lo]),
            "max": float(diagonal[hi]),
            "min_standard_error": None if errors is None else float(errors[lo]),
            "max_standard_error": None if errors is None else float(errors[hi]),
            "largest_standard_error": None if errors is None else float(errors.max()),
        }
        out["_diagonal"] = diagonal
        if errors is not None:
            out["_diagonal_error"] = errors

    def density() -> None:
        ncv = min(lanczos_steps, D)
        (grid, values), seconds = timed(
            lanczos_approximate_spectrum,
            A.device,
            counted,
            ncv=ncv,
            generator=gen,
            num_points=512,
            kappa=8.0,  # kernel width: 1/64 of the spectrum's interval
        )
        out["density"] = {
            "method": "stochastic Lanczos quadrature (Papyan, 2020)",
            "lanczos_steps": ncv,
            "seconds": seconds,
        }
        out["_density"] = (grid, values)

    run = {
        Analysis.TOP_EIG: top_eig,
        Analysis.TRACE: trace,
        Analysis.DIAG: diag,
        Analysis.DENSITY: density,
    }
    with bar:
        for i, analysis in enumerate(what):
            label = f"{analysis.value} {i + 1}/{len(what)}"
            bar.label(label, force=True)
            run[analysis]()
            bar.step()
    out["_products"] = counted.columns
    return out


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``curvops analyze`` from parsed arguments.

    Args:
        args: Parsed arguments.

    Returns:
        The results also written to ``results.json``.

    Raises:
        CLIError: For invalid options or factories.
    """
    from curvops.cli import plots, report

    curvature = parse_curvature(args.curvature)
    what = parse_what(args.what)
    dtype = _parse_dtype(args.dtype)
    top_k = _positive(args.top_k, "--top-k")
    num_matvecs = _positive(args.num_matvecs, "--num-matvecs")
    lanczos_steps = _positive(args.lanczos_steps, "--lanczos-steps")
    device = resolve_device(args.device)
    progressbar = not args.no_progress

    setup = prepare(
        args.model,
        args.data,
        args.loss,
        dtype=dtype,
        device=device,
        weights=getattr(args, "weights", None),
        weights_key=getattr(args, "weights_key", None),
        trust_pickle=getattr(args, "trust_pickle", False),
    )
    try:
        A, t_build = timed(
            build_curvature,
            device,
            curvature,
            setup.model,
            setup.loss_func,
            setup.params,
            setup.data,
            # the operators' per-batch bars only on a terminal: tqdm closes a nested bar with
            # a cursor-up escape sequence that would end up in a redirected log
            progressbar=progressbar and is_interactive(),
            seed=args.seed,
        )
    except (ValueError, TypeError, NotImplementedError, NonDeterministicError) as e:
        raise CLIError(
            f"cannot build the {curvature.value} operator for this model and data: "
            f"{' '.join(str(e).split())}"
        ) from e
    if A.shape[1] < 2:
        raise CLIError("the model has a single parameter; there is nothing to analyse.")
    analyses = run_analyses(
        A,
        what,
        top_k=top_k,
        num_matvecs=num_matvecs,
        lanczos_steps=lanczos_steps,
        seed=args.seed,
        progressbar=progressbar,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    title = TITLES[curvature]
    if "top-eig" in analyses:
        top = analyses["top-eig"]
        files["top-eig"] = plots.plot_eigenvalues(
            {title: torch.tensor(top["eigenvalues"])},
            out / "top_eigenvalues.png",
            errors={title: torch.tensor(top["residual_norms"])},
        ).name
    if "_diagonal" in analyses:
        method = "exact" if analyses["diag"]["exact"] else analyses["diag"]["method"]
        files["diag"] = plots.plot_diagonal(
            {f"{title} diagonal ({method})": analyses.pop("_diagonal")},
            layer_sizes(setup.model),
            out / "diagonal.png",
            errors=analyses.pop("_diagonal_error", None),
        ).name
    if "_density" in analyses:
        grid, density = analyses.pop("_density")
        files["density"] = plots.plot_densities(
            {f"{title}: spectral density": plots.DensityPanel(grid, density)},
            out / "spectral_density.png",
        ).name
    results = {
        "model": args.model,
        "weights": getattr(args, "weights", None),
        "data": args.data,
        "loss": args.loss,
        "curvature": curvature.value,
        "num_params": A.shape[1],
        "num_data": setup.num_data,
        "dtype": args.dtype,
        "device": str(device),
        "seed": args.seed,
        "construct_s": t_build,
        "products": analyses.pop("_products"),
        "analyses": analyses,
        "files": files,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report.analysis_report(results))
    print(f"curvops analyze: wrote report.md, results.json and {len(files)} figure(s) to {out}/")
    return results


__all__ = ["Analysis", "Curvature", "parse_what", "run_analyses", "run_analyze"]
