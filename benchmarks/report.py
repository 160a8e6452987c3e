"""Markdown report of a run: machine, one table per problem, targets met or missed."""

from __future__ import annotations

from benchmarks.runner import Measurement, Results, is_timeout
from benchmarks.tasks import TASKS


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def _limit(seconds: float | None) -> str:
    return "none" if not seconds else f"{seconds:g} s"


def _targets_text(task) -> str:
    parts = []
    if task.time_target is not None:
        parts.append(f"t≤{task.time_target:g}")
    if task.memory_target is not None:
        parts.append(f"mem≤{task.memory_target:g}")
    if task.curvlinops_target is not None:
        parts.append(f"≤{task.curvlinops_target:g}×CL")
    return ", ".join(parts) or "–"


def verdict(task, mine: Measurement | None, compare: bool) -> str:
    """``met`` or ``missed (...)`` for a task's targets; ``–`` if nothing to check."""
    if mine is None:
        return "–"
    if mine.error is not None:
        return "timeout" if is_timeout(mine) else "error"
    missed, checked = [], False
    for target, value, what in (
        (task.time_target, mine.time, "time"),
        (task.memory_target, mine.memory, "mem"),
        (task.curvlinops_target if compare else None, mine.vs_curvlinops, "vs CL"),
    ):
        if target is None or value is None:
            continue
        checked = True
        if value > target:
            missed.append(f"{what} {_num(value)}>{target:g}")
    if not checked:
        return "–"
    return "missed: " + "; ".join(missed) if missed else "met"


def _table(results: Results, problem: str, compare: bool) -> list[str]:
    info = results.problems[problem]
    grad = info.get("gradient_seconds")
    ref = results.get(problem, "gradient", "curvops")
    mem = "" if ref is None or ref.memory_bytes is None else f", {ref.memory_bytes / 2**20:.1f} MiB"
    lines = [
        f"### {problem}: {info['description']}",
        "",
        f"D = {info['num_params']:,} parameters ({info['num_kfac_params']:,} in KFAC layers), "
        f"N = {info['num_data']} data; one gradient: "
        f"{_num(None if grad is None else grad * 1e3)} ms{mem} peak.",
        "",
    ]
    head = "| operation | time [grad] | memory [grad] |"
    rule = "|---|---:|---:|"
    if compare:
        head += " curvlinops time | curvlinops memory | time vs curvlinops |"
        rule += "---:|---:|---:|"
    head += " targets | met? |"
    rule += "---|---|"
    lines += [head, rule]
    for task in TASKS:
        mine = results.get(problem, task.name, "curvops")
        if mine is None:
            continue
        theirs = results.get(problem, task.name, "curvlinops")
        time_cell = "timeout" if is_timeout(mine) and mine.time is None else _num(mine.time)
        if mine.time_spread is not None and mine.time is not None:
            time_cell += f" ±{_num(mine.time_spread)}"
        row = f"| {task.label} | {time_cell} | {_num(mine.memory)} |"
        if compare:
            if theirs is not None and theirs.error is not None:
                word = "timeout" if is_timeout(theirs) else "error"
                row += f" {word} | {word} | – |"
            else:
                t = None if theirs is None else theirs.time
                m = None if theirs is None else theirs.memory
                row += f" {_num(t)} | {_num(m)} | {_num(mine.vs_curvlinops)} |"
        cell = verdict(task, mine, compare)
        if mine.error is not None:
            cell = mine.error if is_timeout(mine) else f"error: {mine.error[:80]}"
        row += f" {_targets_text(task)} | {cell} |"
        lines.append(row)
    errors = [
        m
        for m in results.measurements
        if m.problem == problem and m.error is not None and m.implementation == "curvlinops"
    ]
    if errors:
        lines += ["", "curvlinops errors:"]
        lines += [f"- {m.task}: {m.error}" for m in errors]
    return lines + [""]


def markdown(results: Results, notes: list[str] | None = None) -> str:
    """The report as Markdown.

    Args:
        results: The measurements.
        notes: Extra paragraphs appended at the end (analysis of misses).

    Returns:
        The Markdown text.
    """
    m, c = results.machine, results.config
    compare = bool(c.get("curvlinops"))
    lines = [
        "# curvops benchmark results",
        "",
        "Multiples of one gradient (`torch.autograd.grad` of the loss, i.e. the cost of "
        "`loss.backward()`) over the same data, measured in the same process run; time is the "
        "median over repeats of the ratio to the gradient timed in the same repeat (the calls "
        "in rotating order; ± half the inter-quartile range), memory the peak increase over "
        'the post-set-up baseline, each task in its own child process. "CL" is '
        "curvlinops-for-pytorch.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with "
        f"{m['torch_threads']} threads, Python {m['python']}, {m['platform']}",
        f"- device: {c['device']}" + (f" ({m['gpu']})" if "gpu" in m else ""),
        f"- curvlinops: {m.get('curvlinops', 'not installed')}",
        f"- clock: {c.get('clock', 'wall')} time; repeats: {c['repeats']} (after "
        f"{c['warmup']} warm-up calls); memory method: "
        f"{c.get('memory_method', 'not measured')}; quick sizes: {c['quick']}; time limit per "
        f"task: {_limit(c.get('task_timeout'))}"
        + (f"; resumed a run of {c['resumed_from']}" if c.get("resumed_from") else ""),
        f"- run: `{c['command']}` on {c['date']}",
        "",
    ]
    if not c.get("kfac"):
        lines += ["`curvops.kronecker` was not importable: KFAC rows are missing.", ""]
    for problem in results.problems:
        lines += _table(results, problem, compare)
    if notes:
        lines += ["## Notes", ""] + notes
    return "\n".join(lines) + "\n"
