"""Dense matrices and many-column products, side by side with curvlinops 3.0.1.

Two measurements (issue 15, item 1), in the same process run, CPU time of one thread by
default (``--clock cpu``), medians over repeats that alternate between the libraries:

* ``dense``: ``A.to_dense()`` of the GGN, empirical Fisher, Monte-Carlo Fisher and Hessian of
  the MLP 64-32-10 (``mlp-small``: D = 2,410, 128 data) against curvlinops' ``A @ I``
  (``torch.eye``), as a ratio (target ≤ 1.0).
* ``columns``: per column of a ``K``-column GGN product (default ``K = 32``) against one
  lone product (target ≤ 0.5), and the ``K``-column product against curvlinops' (target
  ≤ 0.6), on the suite's ``mlp``, ``cnn``, ``resnet`` and ``gpt`` problems.

Usage::

    python -m benchmarks.dense_columns --threads 1 --repeats 5
    python -m benchmarks.dense_columns --what columns --problems cnn --columns 64

Results are printed as Markdown (and appended to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.problems import make_problem

CLASSES = {
    "ggn": "GGNLinearOperator",
    "ef": "EFLinearOperator",
    "mc": "FisherMCLinearOperator",
    "hessian": "HessianLinearOperator",
}


def _medians(fns: list[Callable[[], Any] | None], repeats: int, warmup: int, clock) -> list:
    """Median time of each function; repeats alternate between them (fair under drift)."""
    live = [f for f in fns if f is not None]
    for _ in range(warmup):
        for fn in live:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            if fn is None:
                continue
            start = clock()
            fn()
            record.append(clock() - start)
    return [statistics.median(t) if t else None for t in times]


def _operators(problem, kind: str):
    import curvops

    args = (problem.model, problem.loss_func, problem.params, problem.data)
    ours = getattr(curvops, CLASSES[kind])(*args, check_deterministic=False)
    theirs = None
    try:
        import curvlinops

        theirs = getattr(curvlinops, CLASSES[kind])(*args, check_deterministic=False)
    except ImportError:
        pass
    return ours, theirs


def dense(repeats: int, warmup: int, clock, kinds: list[str]) -> list[str]:
    """Rows of the dense-matrix table."""
    problem = make_problem("mlp-small")
    rows = [
        "| matrix | curvops `to_dense()` [s] | curvlinops `A @ I` [s] | ratio | target ≤ 1.0 |",
        "|---|---:|---:|---:|---|",
    ]
    for kind in kinds:
        ours, theirs = _operators(problem, kind)
        eye = torch.eye(ours.shape[1])
        t_ours, t_theirs = _medians(
            [ours.to_dense, None if theirs is None else (lambda t=theirs, e=eye: t @ e)],
            repeats,
            warmup,
            clock,
        )
        ratio = "–" if t_theirs is None else f"{t_ours / t_theirs:.2f}"
        met = "–" if t_theirs is None else ("met" if t_ours <= t_theirs else "missed")
        their = "–" if t_theirs is None else f"{t_theirs:.3f}"
        rows.append(f"| {kind} | {t_ours:.3f} | {their} | {ratio} | {met} |")
        print(rows[-1], flush=True)
    return rows


def columns(repeats: int, warmup: int, clock, names: list[str], K: int, compare: bool) -> list[str]:
    """Rows of the many-column table (GGN)."""
    rows = [
        f"| problem | lone product [s] | {K} columns [s] | per column / lone (≤ 0.5) "
        f"| curvlinops {K} columns [s] | vs curvlinops (≤ 0.6) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        problem = make_problem(name)
        ours, theirs = _operators(problem, "ggn")
        if not compare:
            theirs = None
        gen = torch.Generator().manual_seed(1)
        v = torch.randn(ours.shape[1], generator=gen)
        V = torch.randn(ours.shape[1], K, generator=gen)

        def theirs_fn(theirs=theirs, V=V):
            return theirs @ V

        if theirs is not None:
            try:
                theirs @ V[:, :2]
            except NotImplementedError as e:
                print(f"curvlinops on {name}: {str(e).splitlines()[0][:80]}", file=sys.stderr)
                theirs = None
        t_one, t_many, t_theirs = _medians(
            [
                lambda A=ours, v=v: A @ v,
                lambda A=ours, V=V: A @ V,
                None if theirs is None else theirs_fn,
            ],
            repeats,
            warmup,
            clock,
        )
        per = t_many / K / t_one
        their = "error/–" if t_theirs is None else f"{t_theirs:.3f}"
        vs = "–" if t_theirs is None else f"{t_many / t_theirs:.2f}"
        rows.append(f"| {name} | {t_one:.4f} | {t_many:.3f} | {per:.2f} | {their} | {vs} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the measurements and print (and optionally append) the Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", default="dense,columns")
    parser.add_argument("--problems", default="mlp,cnn,resnet,gpt")
    parser.add_argument("--kinds", default="ggn,ef,mc,hessian")
    parser.add_argument("--columns", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    what = args.what.split(",")
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
        f"`python -m benchmarks.dense_columns {' '.join(argv or sys.argv[1:])}`; "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"medians of {args.repeats} repeats after {args.warmup} warm-up(s).",
        "",
    ]
    if "dense" in what:
        lines += dense(args.repeats, args.warmup, clock, args.kinds.split(",")) + [""]
    if "columns" in what:
        names = args.problems.split(",")
        lines += columns(
            args.repeats, args.warmup, clock, names, args.columns, not args.no_compare
        ) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
