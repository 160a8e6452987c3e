"""Where a laplace-torch ``kron`` fit spends its time: the backend's ``kron`` against the rest.

Times ``Laplace(..., hessian_structure="kron").fit(loader)`` with curvops' ``CurvopsEF`` (or
``CurvopsGGN``) and laplace-torch's default ``CurvlinopsEF`` (``CurvlinopsGGN``) on the digits
MLP of :mod:`benchmarks.laplace_fit`, alternating between them, and splits each fit into the
backend's ``kron`` calls (one per batch) and everything else laplace does (data loading,
adding the Kronecker factors, their eigendecompositions). CPU time of one thread, medians over
fits after warm-up fits.

Usage (needs laplace-torch, see docs/laplace.md)::

    python benchmarks/laplace_kron_split.py --subset all --curvature ef --fits 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.laplace_fit import _problem


def _timed(cls: type, totals: dict, name: str) -> type:
    """A subclass of the backend ``cls`` adding the CPU time of its ``kron`` to ``totals``."""

    class Timed(cls):
        def kron(self, *args, **kwargs):
            start = time.process_time()
            try:
                return super().kron(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - start

    return Timed


def main(argv: list[str] | None = None) -> None:
    """Print the medians per fit: whole fit, the backend's ``kron`` calls, the rest [ms]."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=["all", "last_layer"], default="all")
    parser.add_argument("--curvature", choices=["ef", "ggn"], default="ef")
    parser.add_argument("--fits", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    from curvops.integrations.laplace import CurvopsEF, CurvopsGGN

    model, train, _ = _problem(torch.float32, 1024)
    loader = DataLoader(TensorDataset(*train), batch_size=256)
    ours, theirs = (
        (CurvopsEF, CurvlinopsEF) if args.curvature == "ef" else (CurvopsGGN, CurvlinopsGGN)
    )
    totals = {"curvops": 0.0, "default": 0.0}
    backends = {
        "curvops": _timed(ours, totals, "curvops"),
        "default": _timed(theirs, totals, "default"),
    }
    fits = {name: [] for name in backends}
    krons = {name: [] for name in backends}
    for i in range(args.warmup + args.fits):
        order = ["curvops", "default"] if i % 2 else ["default", "curvops"]
        for name in order:
            totals[name] = 0.0
            start = time.process_time()
            la = Laplace(
                model,
                "classification",
                subset_of_weights=args.subset,
                hessian_structure="kron",
                backend=backends[name],
            )
            la.fit(loader)
            if i >= args.warmup:
                fits[name].append(time.process_time() - start)
                krons[name].append(totals[name])
    print(f"subset={args.subset} curvature={args.curvature}: medians of {args.fits} fits [ms]")
    for name in backends:
        rest = [f - k for f, k in zip(fits[name], krons[name])]
        fit, kron = statistics.median(fits[name]), statistics.median(krons[name])
        rest = statistics.median(rest)
        print(
            f"{name:8s} fit {1e3 * fit:7.3f}  kron calls {1e3 * kron:7.3f}  rest {1e3 * rest:7.3f}"
        )


if __name__ == "__main__":
    main()
