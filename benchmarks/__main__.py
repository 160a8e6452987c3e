"""Command line: ``python -m benchmarks [--problems mlp,cnn] [--device cpu|cuda] ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.plot import plot
from benchmarks.problems import CPU_PROBLEMS, CUDA_ONLY_PROBLEMS, problem_names
from benchmarks.report import markdown
from benchmarks.runner import DEFAULT_TASK_TIMEOUT, Results, run_suite
from benchmarks.tasks import TASKS_BY_NAME


def _names(text: str, known: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"Unknown {what} {unknown}; choose from {', '.join(known)}.")
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write the Markdown report, a JSON dump and the plot."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--problems",
        default=None,
        help=f"comma-separated, from {','.join(problem_names())} (default: "
        f"{','.join(CPU_PROBLEMS)}, plus {','.join(CUDA_ONLY_PROBLEMS)} on cuda)",
    )
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (robust on shared machines; use with --threads 1)",
    )
    parser.add_argument("--out", default="benchmarks/RESULTS.md", help="Markdown report path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (smoke test)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory children")
    parser.add_argument("--no-compare", action="store_true", help="skip curvlinops")
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=DEFAULT_TASK_TIMEOUT,
        help="seconds per task (timed in a child process that is killed after them and "
        f"recorded as 'timeout'); 0: no limit, timed in this process (default "
        f"{DEFAULT_TASK_TIMEOUT:g})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of the JSON next to --out and measure only the tasks it lacks",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="re-render the report and plot from a saved RESULTS.json (no measurements)",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        results = Results.from_dict(json.loads(Path(args.from_json).read_text()))
        _write(results, Path(args.out), results.config["device"])
        return 0

    default = CPU_PROBLEMS + (CUDA_ONLY_PROBLEMS if args.device == "cuda" else [])
    problems = (
        default if args.problems is None else _names(args.problems, problem_names(), "problems")
    )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch.cuda.is_available() is False.")
    elif any(p in CUDA_ONLY_PROBLEMS for p in problems):
        raise SystemExit(f"{CUDA_ONLY_PROBLEMS} are sized for a GPU; use --device cuda.")
    tasks = None if args.tasks is None else _names(args.tasks, list(TASKS_BY_NAME), "tasks")
    out = Path(args.out)
    resume = None
    if args.resume:
        saved = out.with_suffix(".json")
        if not saved.exists():
            raise SystemExit(f"--resume: no {saved} to resume from; run without --resume first.")
        resume = Results.from_dict(json.loads(saved.read_text()))
    results = run_suite(
        problems,
        tasks,
        device=args.device,
        repeats=2 if args.quick else args.repeats,
        warmup=1 if args.quick else args.warmup,
        quick=args.quick,
        memory=not args.no_memory,
        compare=not args.no_compare,
        threads=args.threads,
        clock=args.clock,
        task_timeout=args.task_timeout or None,
        resume=resume,
        on_update=lambda r: _write(r, out, args.device, with_plot=False),
    )
    _write(results, out, args.device)
    return 0


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader, or a kill, never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(results: Results, out: Path, device: str, with_plot: bool = True) -> None:
    """Write the Markdown report (with NOTES.md appended), the JSON dump and the plot.

    Called after every task without the plot (NOTE [a run that survives limits] in
    :mod:`benchmarks.runner`) and once at the end with it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    notes_file = out.with_name("NOTES.md")
    notes = notes_file.read_text().splitlines() if notes_file.exists() else None
    _replace(out.with_suffix(".json"), json.dumps(results.to_dict(), indent=1))
    _replace(out, markdown(results, notes))
    if not with_plot:
        return
    png = out.with_name(f"results_{device}.png")
    plot(results, png)
    print(f"wrote {out}, {out.with_suffix('.json')} and {png}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
