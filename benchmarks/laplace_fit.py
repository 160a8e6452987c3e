"""laplace-torch's ``fit`` with curvops' backends against its default backend (curvlinops).

Problem: an MLP 64-32-10 (D = 2,410 parameters; the last layer has 330) on scikit-learn's
digits, cross-entropy loss, trained briefly with full-batch Adam. For each Hessian
structure (``kron``, ``diag``, ``full``), subset of weights (``all``, ``last_layer``) and
curvature (GGN, empirical Fisher) we time ``Laplace(...).fit(loader)`` with
``CurvopsGGN``/``CurvopsEF`` and with laplace-torch's ``CurvlinopsGGN``/``CurvlinopsEF``
(medians of repeats, in seconds and in multiples of one gradient over the same data, the
same run) and report how far apart the two fits are: the log marginal likelihood at prior
precision 1, the curvature (relative Frobenius norm of the difference) and the GLM
predictive (probit) on 200 held-out digits (largest absolute difference of a probability).
The tests (``tests/integrations/test_laplace.py``) check curvops' fits against dense
references; this script only compares.

Usage (needs laplace-torch, see docs/laplace.md)::

    python benchmarks/laplace_fit.py                      # writes benchmarks/LAPLACE_FIT.md
    python benchmarks/laplace_fit.py --repeats 5 --structures kron,diag --dtype float64
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _problem(dtype: torch.dtype, num_train: int):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=dtype), torch.tensor(y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        perm = torch.randperm(len(X))
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    X, y = X[perm], y[perm]
    train, test = (X[:num_train], y[:num_train]), (X[-200:], y[-200:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train[0]), train[1]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval(), train, test


def _median_times(fns: list, repeats: int, warmup: int, clock) -> list[float]:
    """Median time of each function; repeats alternate between them (fair under drift)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = clock()
            fn()
            record.append(clock() - start)
    return [statistics.median(t) for t in times]


def _gradient(model, loader):
    params = list(model.parameters())

    def gradient() -> None:
        for X, y in loader:
            torch.autograd.grad(nn.functional.cross_entropy(model(X), y, reduction="sum"), params)

    return gradient


def _fitter(Laplace, model, loader, subset: str, structure: str, backend):
    """A function fitting a new Laplace approximation (what is timed)."""

    def fit():
        la = Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
            backend=backend,
        )
        la.fit(loader)
        return la

    return fit


def _curvature(la, structure: str) -> torch.Tensor:
    if structure == "kron":
        return la.H_facs.to_matrix()
    return la.H


def _compare(ours, theirs, structure: str, X_test) -> dict[str, float]:
    one = torch.tensor(1.0, dtype=X_test.dtype)
    lml = [la.log_marginal_likelihood(one).item() for la in (ours, theirs)]
    H = [_curvature(la, structure) for la in (ours, theirs)]
    p = [la(X_test, pred_type="glm", link_approx="probit") for la in (ours, theirs)]
    return {
        "lml_rel": abs(lml[0] - lml[1]) / abs(lml[1]),
        "H_rel": (torch.linalg.norm(H[0] - H[1]) / torch.linalg.norm(H[1])).item(),
        "pred_abs": (p[0] - p[1]).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="process CPU time (default; robust on a shared machine with --threads 1) or wall",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--structures", default="kron,diag,full")
    parser.add_argument("--subsets", default="all,last_layer")
    parser.add_argument("--out", default="benchmarks/LAPLACE_FIT.md")
    args = parser.parse_args(argv)

    import warnings

    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    from curvops.integrations.laplace import CurvopsEF, CurvopsGGN

    warnings.filterwarnings("ignore", message="By default `link_approx`")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, (X, y), (X_test, _) = _problem(dtype, args.num_train)
    loader = DataLoader(TensorDataset(X, y), batch_size=args.batch_size)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t_grad = _median_times([_gradient(model, loader)], args.repeats, args.warmup, clock)[0]
    backends = {"GGN": (CurvopsGGN, CurvlinopsGGN), "EF": (CurvopsEF, CurvlinopsEF)}

    rows = []
    for subset in args.subsets.split(","):
        for structure in args.structures.split(","):
            for curvature, pair in backends.items():
                fitters = [_fitter(Laplace, model, loader, subset, structure, b) for b in pair]
                times = _median_times(fitters, args.repeats, args.warmup, clock)
                fits = [fit() for fit in fitters]
                agreement = _compare(*fits, structure, X_test)
                rows.append((subset, structure, curvature, *times, agreement))
                print(subset, structure, curvature, f"{times[0]:.3f}s / {times[1]:.3f}s", agreement)

    lines = [
        "# laplace-torch fit: curvops backends vs the default (curvlinops) backend",
        "",
        f"Run {datetime.date.today()}: `python benchmarks/laplace_fit.py "
        f"--repeats {args.repeats} --threads {args.threads} --clock {args.clock} "
        f"--dtype {args.dtype} --num-train {args.num_train} --batch-size {args.batch_size}`; "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock. MLP "
        f"64-32-10 (D = 2,410; last layer 330) on {args.num_train} digits in batches of "
        f"{args.batch_size}; one gradient over the data takes {t_grad * 1e3:.2f} ms. Times are "
        f"medians of {args.repeats} fits after {args.warmup} warm-up(s), alternating between "
        "the backends. Agreement: relative difference of the log marginal likelihood (prior "
        "precision 1) and of the curvature (Frobenius), largest absolute difference of a "
        "predictive probability (GLM, probit) on 200 held-out digits.",
        "",
        "| subset | structure | curvature | curvops s (grads) | default s (grads) | "
        "curvops / default | lml rel. diff | H rel. diff | predictive abs. diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for subset, structure, curvature, ours, theirs, agreement in rows:
        lines.append(
            f"| {subset} | {structure} | {curvature} | {ours:.3f} ({ours / t_grad:.0f}) | "
            f"{theirs:.3f} ({theirs / t_grad:.0f}) | {ours / theirs:.2f} | "
            f"{agreement['lml_rel']:.1e} | {agreement['H_rel']:.1e} | "
            f"{agreement['pred_abs']:.1e} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
