"""Hessian-vector products by reverse-over-reverse and by forward-over-reverse, per net.

``python -m benchmarks.hessian_mode [--problems mlp,cnn,cnn3,resnet,gpt] [--repeats 10]``
times, in the same run and interleaved repeat by repeat, the gradient, ``H @ v`` of
:class:`curvops.HessianLinearOperator` with each explicit ``mode``, with the default mode (the
rule of :func:`curvops.curvature.products.hessian_mode_for`) and, when installed,
curvlinops' ``HessianLinearOperator @ v`` (forward-over-reverse), with process CPU time and one
thread (robust on shared machines), in an order rotated from repeat to repeat. It prints a
Markdown table of medians of the per-repeat ratios: each product in gradients, and each of
ours against the reference.

``cnn3`` is a three-stage CNN with max-pooling (3x32x32, batch 32) next to the suite's
two-stage ``cnn`` (batch 64): the nets of the Hessian-mode question of issue 15 (item 6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.problems import Problem, make_problem
from benchmarks.tasks import curvlinops_available, setup

MODES = ("reverse-over-reverse", "forward-over-reverse")


def cnn3_problem(seed: int = 0) -> Problem:
    """Three conv-ReLU-maxpool stages (16/32/64 channels) and a linear layer, batch 32 x 2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 10),
        ).eval()
        data = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(2)]
    return Problem(
        name="cnn3",
        description="CNN 3x(conv3x3-ReLU-maxpool) 16/32/64 ch + linear, 3x32x32, batch 32",
        model=model,
        loss_func=nn.CrossEntropyLoss(),
        data=data,
        params=list(model.parameters()),
        kfac_params=[],
        num_classes=10,
    )


def build(name: str) -> Problem:
    """A suite problem, or ``cnn3``."""
    return cnn3_problem() if name == "cnn3" else make_problem(name)


def closures(problem: Problem) -> dict[str, Callable[[], Any]]:
    """The timed closures: gradient, ours per mode, ours by default, the reference."""
    from curvops import HessianLinearOperator

    v = torch.randn(
        sum(p.numel() for p in problem.params), generator=torch.Generator().manual_seed(1)
    )
    args = (problem.model, problem.loss_func, problem.params, problem.data)
    out: dict[str, Callable[[], Any]] = {"gradient": setup("gradient", problem, "curvops")}
    default = HessianLinearOperator(*args, check_deterministic=False)
    for mode in MODES:
        op = HessianLinearOperator(*args, mode=mode, check_deterministic=False)
        out[mode] = lambda op=op: op @ v
    out["default"] = lambda: default @ v
    if curvlinops_available():
        ref = setup("hessian_mvp", problem, "curvlinops")
        try:
            ref()
            out["curvlinops"] = ref
        except Exception as e:  # e.g. forward mode through fused attention
            print(f"[{problem.name}] curvlinops: {type(e).__name__}: {e}"[:200], file=sys.stderr)
    out["default"]()
    out["chosen"] = default.hessian_mode.value  # type: ignore[assignment]
    return out


def measure(problem: Problem, repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved CPU-time repeats; medians of per-repeat ratios."""
    fns = closures(problem)
    chosen = fns.pop("chosen")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        # rotate the order: the closure that runs right after another one pays for its
        # fresh allocations (page faults count as CPU time) differently (measured: up to
        # 20 % on the CNN), so each closure takes each position equally often
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - start)

    def ratio(a: str, b: str) -> float | None:
        if a not in times or b not in times:
            return None
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result: dict[str, Any] = {"problem": problem.name, "chosen": chosen}
    result["gradients"] = {k: ratio(k, "gradient") for k in times if k != "gradient"}
    result["vs_curvlinops"] = {k: ratio(k, "curvlinops") for k in (*MODES, "default")}
    result["forward_vs_reverse"] = ratio(*reversed(MODES))
    result["gradient_seconds"] = statistics.median(times["gradient"])
    return result


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results."""
    lines = [
        "| net | RoR [grad] | FoR [grad] | default [grad] | curvlinops [grad] | RoR / CL "
        "| FoR / CL | default / CL | FoR / RoR | rule chose |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        g, c = r["gradients"], r["vs_curvlinops"]
        lines.append(
            f"| {r['problem']} | {_num(g[MODES[0]])} | {_num(g[MODES[1]])} | "
            f"{_num(g['default'])} | {_num(g.get('curvlinops'))} | {_num(c[MODES[0]])} | "
            f"{_num(c[MODES[1]])} | {_num(c['default'])} | {_num(r['forward_vs_reverse'])} | "
            f"{r['chosen']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table (and optionally write JSON)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hessian_mode")
    parser.add_argument("--problems", default="mlp,cnn,cnn3,resnet,gpt")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.problems.split(","):
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows.append(measure(build(name.strip()), args.repeats, args.warmup))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), CPU time, "
        f"medians of {args.repeats} repeats; `python -m benchmarks.hessian_mode "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
