"""Cost of building KFOC in multiples of one gradient, against the number of power iterations.

KFOC (``curvops.kronecker.KFOCLinearOperator``) runs KFAC's statistics pass and then one
product with every layer's rearranged block per power iteration, over cached per-datum
statistics or, without a cache, with one more pass over the data (NOTE [KFOC passes and
cache] in ``src/curvops/kronecker/kfoc.py``). This script times, on a problem of the benchmark
suite (KFAC's parameters: the ``nn.Linear``/``nn.Conv2d`` layers):

* KFAC's factors (the reference for the first pass);
* KFOC with a fixed number of iterations (``tolerance`` below reach), cached and uncached;
* KFOC with its default options, with the iterations each block took.

Each number is the median over repeats of (build time / gradient time of the same repeat), as
in ``benchmarks/timing.py``.

Usage::

    python -m benchmarks.kfoc_cost                          # mlp, "type-2" and "mc"
    python -m benchmarks.kfoc_cost --problem cnn --iterations 1,2,5 --repeats 3
"""

from __future__ import annotations

import argparse
import warnings

import torch

from benchmarks.problems import make_problem
from benchmarks.tasks import _gradient
from benchmarks.timing import time_task


def _kfac(problem, fisher_type: str):
    from curvops.kronecker import KFACLinearOperator

    def build():
        K = KFACLinearOperator(
            problem.model,
            problem.loss_func,
            problem.kfac_params,
            problem.data,
            fisher_type=fisher_type,
            check_deterministic=False,
        )
        K.compute_factors()

    return build


def _kfoc(problem, fisher_type: str, **options):
    from curvops.kronecker import KFOCLinearOperator

    def build():
        K = KFOCLinearOperator(
            problem.model,
            problem.loss_func,
            problem.kfac_params,
            problem.data,
            fisher_type=fisher_type,
            check_deterministic=False,
            **options,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # fixed iteration counts
            K.compute_factors()
        build.operator = K

    return build


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the measurements and print a Markdown table.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` if ``None``).

    Returns:
        One row per configuration.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="mlp")
    parser.add_argument("--fisher-types", default="type-2,mc")
    parser.add_argument("--iterations", default="1,2,5,10")
    parser.add_argument("--uncached-iterations", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=("wall", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny problem sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = make_problem(args.problem, quick=args.quick)
    gradient = _gradient(problem)
    device = problem.params[0].device

    def measure(build) -> float:
        timing, _, _ = time_task(
            gradient,
            build,
            None,
            device=device,
            repeats=args.repeats,
            warmup=args.warmup,
            clock=args.clock,
        )
        return timing.gradients

    rows = []
    print(f"{problem.description}, {problem.num_data} data; build cost in gradients\n")
    print("| fisher type | operator | iterations | statistics | gradients |")
    print("| --- | --- | --- | --- | --- |")
    for fisher_type in args.fisher_types.split(","):
        configs = [("KFAC", "-", "-", _kfac(problem, fisher_type))]
        for cached, counts in ((True, args.iterations), (False, args.uncached_iterations)):
            for count in (int(c) for c in counts.split(",") if c):
                options = {"max_iterations": count, "tolerance": 1e-30}
                if not cached:
                    options["max_cache_bytes"] = 0
                label = "cached" if cached else "passes"
                configs.append(("KFOC", str(count), label, _kfoc(problem, fisher_type, **options)))
        default = _kfoc(problem, fisher_type)
        configs.append(("KFOC (defaults)", "", "cached", default))
        for name, count, label, build in configs:
            cost = measure(build)
            if build is default:
                convergence = build.operator.convergence
                count = "/".join(str(c.iterations) for c in convergence.values())
            rows.append(
                {
                    "fisher_type": fisher_type,
                    "operator": name,
                    "iterations": count,
                    "statistics": label,
                    "gradients": cost,
                }
            )
            print(f"| {fisher_type} | {name} | {count} | {label} | {cost:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
