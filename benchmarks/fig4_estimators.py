"""Accuracy and error-bar coverage of the trace and diagonal estimators (paper's Fig. 4).

The matrices are A = Q diag(i^{-c}) Q^T, i = 1..D, with Q from the QR decomposition of a
Gaussian matrix. For every decay rate c and budget of products, each estimator runs
``--runs`` times; the first table shows the median (25th-75th percentile) relative error:
|t_hat - t| / |t| for traces and max_i |a_i - a_hat_i| / max_j |a_j| for diagonals, as in
the paper. The second shows how often ``estimate ± 2 * error`` (``return_error=True``)
covers the truth (for diagonals: the fraction of run-entry pairs), which NOTE [estimator
error bars] promises to be about 95%. The third shows median-error ratios measured in the
same run: XTrace / Hutch++, and with ``--reference`` each estimator / the same estimator of
curvlinops (installed separately; a side-by-side only, never used by curvops).

Run:  python benchmarks/fig4_estimators.py  [--runs 2000 --num-matvecs 12 --reference]
"""

import argparse
import time

import torch

from curvops.linalg import hutchinson_diag, hutchinson_trace, hutchpp_trace, xdiag, xtrace
from curvops.structured import TensorLinearOperator

TRACE_ESTIMATORS = {
    "hutchinson_trace": hutchinson_trace,
    "hutchpp_trace": hutchpp_trace,
    "xtrace": xtrace,
}
DIAG_ESTIMATORS = {"hutchinson_diag": hutchinson_diag, "xdiag": xdiag}


def power_law_matrix(dim: int, c: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    eigenvalues = torch.arange(1, dim + 1, dtype=torch.float64) ** (-c)
    return (Q * eigenvalues) @ Q.T


def errors_and_coverage(name: str, estimates, errors, A):
    """Relative errors per run (paper's measure), and coverage of estimate ± 2 * error."""
    if name in TRACE_ESTIMATORS:
        truth = torch.trace(A)
        relative = (estimates - truth).abs() / truth.abs()
    else:
        truth = torch.diagonal(A)
        relative = (estimates - truth).abs().amax(dim=1) / truth.abs().max()
    if errors is None:
        return relative, float("nan")
    covered = ((estimates - truth).abs() <= 2 * errors).double().mean().item()
    return relative, covered


def run_curvops(name: str, A, num_matvecs: int, runs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    op = TensorLinearOperator(A)  # wrap once (wrapping checks symmetry)
    estimator = {**TRACE_ESTIMATORS, **DIAG_ESTIMATORS}[name]
    results = [estimator(op, num_matvecs, generator=g, return_error=True) for _ in range(runs)]
    estimates = torch.stack([r.estimate for r in results])
    errors = torch.stack([r.error for r in results])
    return errors_and_coverage(name, estimates, errors, A)


def run_reference(name: str, A, num_matvecs: int, runs: int, seed: int):
    import curvlinops  # a side-by-side only

    torch.manual_seed(seed)  # the reference draws from the global generator
    estimator = getattr(curvlinops, name)
    estimates = torch.stack([estimator(A, num_matvecs) for _ in range(runs)])
    return errors_and_coverage(name, estimates, None, A)


def cell(err: torch.Tensor) -> str:
    q25, q50, q75 = torch.quantile(err, torch.tensor([0.25, 0.5, 0.75], dtype=err.dtype))
    return f"{q50:.2e} ({q25:.1e}-{q75:.1e})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--num-matvecs", type=int, nargs="+", default=[12, 30, 90])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference", action="store_true", help="also run curvlinops' estimators side by side"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # tiny problems: threads only add overhead

    start = time.perf_counter()
    names = [*TRACE_ESTIMATORS, *DIAG_ESTIMATORS]
    matrices = {c: power_law_matrix(args.dim, c, args.seed) for c in args.decays}
    medians, coverage, reference = {}, {}, {}
    for name in names:
        for n in args.num_matvecs:
            for c in args.decays:
                err, cov = run_curvops(name, matrices[c], n, args.runs, args.seed + 1)
                medians[name, n, c], coverage[name, n, c] = err, cov
                if args.reference:
                    ref, _ = run_reference(name, matrices[c], n, args.runs, args.seed + 1)
                    reference[name, n, c] = ref

    def table(title, rows, fmt):
        print(f"\n{title}")
        header = f"{'estimator':<30} {'matvecs':>7} " + " ".join(
            f"{f'c = {c:g}':>24}" for c in args.decays
        )
        print(header)
        print("-" * len(header))
        for label, n, values in rows:
            print(f"{label:<30} {n:>7} " + " ".join(f"{fmt(v):>24}" for v in values))

    def keyed(store, name):
        return [(name, n, [store[name, n, c] for c in args.decays]) for n in args.num_matvecs]

    print(
        f"{args.runs} runs per cell, D = {args.dim}, A = Q diag(i^-c) Q^T, seed {args.seed}, "
        f"{args.threads} thread(s)"
    )
    table(
        "Median (25%-75%) relative error",
        [row for name in names for row in keyed(medians, name)]
        + [
            (f"curvlinops {name}", n, values)
            for name in (names if args.reference else [])
            for _, n, values in keyed(reference, name)
        ],
        cell,
    )
    table(
        "Coverage of estimate ± 2 * error (fraction of runs; diagonals: of run-entry pairs)",
        [row for name in names for row in keyed(coverage, name)],
        lambda v: f"{v:.3f}",
    )
    ratios = [
        (
            "xtrace / hutchpp_trace",
            n,
            [
                (medians["xtrace", n, c].median() / medians["hutchpp_trace", n, c].median()).item()
                for c in args.decays
            ],
        )
        for n in args.num_matvecs
    ]
    if args.reference:
        ratios += [
            (
                f"{name} / curvlinops",
                n,
                [
                    (medians[name, n, c].median() / reference[name, n, c].median()).item()
                    for c in args.decays
                ],
            )
            for name in names
            for n in args.num_matvecs
        ]
    table("Ratios of median relative errors (same runs)", ratios, lambda v: f"{v:.3f}")
    print(f"\n(total time {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
