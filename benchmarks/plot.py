"""Bar charts of a run: time and peak memory in gradients per task, both libraries."""

from __future__ import annotations

from pathlib import Path

from benchmarks.runner import Results
from benchmarks.tasks import TASKS


def plot(results: Results, path: str | Path) -> None:
    """Save one row of two panels (time, memory) per problem, log scale, targets as ticks.

    Args:
        results: The measurements.
        path: Output PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(results.problems)
    measured = {m.task for m in results.measurements}
    tasks = [t for t in TASKS if t.name != "gradient" and t.name in measured]
    fig, axes = plt.subplots(
        len(problems), 2, figsize=(14, 3.2 * len(problems)), squeeze=False, sharey=False
    )
    impls = [("curvops", "tab:blue"), ("curvlinops", "tab:orange")]
    for row, problem in zip(axes, problems):
        for ax, metric, title in (
            (row[0], "time", "run time"),
            (row[1], "memory", "peak memory"),
        ):
            for j, (impl, color) in enumerate(impls):
                xs, ys = [], []
                for i, task in enumerate(tasks):
                    m = results.get(problem, task.name, impl)
                    value = None if m is None else getattr(m, metric)
                    if value is not None and value > 0:
                        xs.append(i + (j - 0.5) * 0.4)
                        ys.append(value)
                if xs:
                    ax.bar(xs, ys, width=0.4, color=color, label=impl)
            for i, task in enumerate(tasks):
                target = task.time_target if metric == "time" else task.memory_target
                if target is not None:
                    ax.hlines(target, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_yscale("log")
            ax.set_xticks(range(len(tasks)))
            ax.set_xticklabels([t.label for t in tasks], rotation=35, ha="right", fontsize=7)
            ax.set_ylabel("gradients")
            ax.set_title(f"{problem}: {title} (dashed: target)", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    device = results.config["device"]
    fig.suptitle(f"curvops benchmarks ({device}; {results.machine['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
