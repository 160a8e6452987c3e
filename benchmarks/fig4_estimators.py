"""Accuracy of the trace and diagonal estimators on the toy problems of the paper's Fig. 4.

The matrices are A = Q diag(i^{-c}) Q^T, i = 1..D, with Q from the QR decomposition of a
Gaussian matrix. For every decay rate c and budget of products, each estimator runs
``--runs`` times; the table shows the median (25th-75th percentile) relative error:
|t_hat - t| / |t| for traces and max_i |a_i - a_hat_i| / max_j |a_j| for diagonals, as in
the paper. Only the public API of ``curvops.linalg`` is used.

Run:  python benchmarks/fig4_estimators.py  [--runs 200 --dim 200 --num-matvecs 30 90]
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


def relative_errors(name: str, estimator, A, num_matvecs: int, runs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    op = TensorLinearOperator(A)  # wrap once (wrapping checks symmetry)
    estimates = torch.stack([estimator(op, num_matvecs, generator=g) for _ in range(runs)])
    if name in TRACE_ESTIMATORS:
        truth = torch.trace(A)
        return (estimates - truth).abs() / truth.abs()
    truth = torch.diagonal(A)
    return (estimates - truth).abs().amax(dim=1) / truth.abs().max()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--num-matvecs", type=int, nargs="+", default=[30, 90])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny problems: threads only add overhead

    start = time.perf_counter()
    estimators = {**TRACE_ESTIMATORS, **DIAG_ESTIMATORS}
    print(
        f"Median (25%-75%) relative error over {args.runs} runs, D = {args.dim}, "
        f"A = Q diag(i^-c) Q^T"
    )
    header = f"{'estimator':<17} {'matvecs':>7} " + " ".join(
        f"{f'c = {c:g}':>24}" for c in args.decays
    )
    print(header)
    print("-" * len(header))
    matrices = {c: power_law_matrix(args.dim, c, args.seed) for c in args.decays}
    for name, estimator in estimators.items():
        for num_matvecs in args.num_matvecs:
            cells = []
            for c in args.decays:
                err = relative_errors(
                    name, estimator, matrices[c], num_matvecs, args.runs, args.seed + 1
                )
                q25, q50, q75 = torch.quantile(
                    err, torch.tensor([0.25, 0.5, 0.75], dtype=err.dtype)
                )
                cells.append(f"{q50:.2e} ({q25:.1e}-{q75:.1e})")
            print(f"{name:<17} {num_matvecs:>7} " + " ".join(f"{cell:>24}" for cell in cells))
    print(f"\n(total time {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
