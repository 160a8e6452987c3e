"""Run the suite: every task on every problem, time and peak memory, both libraries."""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks.memory import fork_context, peak_memory, timeout_text
from benchmarks.problems import Problem, make_problem
from benchmarks.tasks import (
    IMPLEMENTATIONS,
    TASKS,
    curvlinops_available,
    kfac_available,
    needs_kfac,
    setup,
)
from benchmarks.timing import time_task


@dataclass
class Measurement:
    """One task on one problem with one implementation (multiples of one gradient)."""

    problem: str
    task: str
    implementation: str
    seconds: float | None = None
    time: float | None = None
    time_spread: float | None = None
    vs_curvlinops: float | None = None
    memory: float | None = None
    memory_bytes: float | None = None
    error: str | None = None
    gradient_seconds: float | None = None


@dataclass
class Results:
    """Everything one run measured, plus the machine it ran on."""

    machine: dict
    config: dict
    problems: dict = field(default_factory=dict)  # name -> description, D, N, gradient seconds
    measurements: list[Measurement] = field(default_factory=list)

    def get(self, problem: str, task: str, implementation: str) -> Measurement | None:
        """The measurement of a task, or ``None``."""
        for m in self.measurements:
            if (m.problem, m.task, m.implementation) == (problem, task, implementation):
                return m
        return None

    def to_dict(self) -> dict:
        """Plain-Python form (for JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Results:
        """Inverse of :meth:`to_dict`."""
        measurements = [Measurement(**m) for m in data["measurements"]]
        return cls(data["machine"], data["config"], data["problems"], measurements)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, threads, library versions and the GPU (if used)."""
    info = {
        "cpu": _cpu_model(),
        "cores": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if curvlinops_available():
        from importlib.metadata import version

        info["curvlinops"] = version("curvlinops-for-pytorch")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


DEFAULT_TASK_TIMEOUT = 1800.0
"""Seconds one task may take (timing, both libraries) before its child process is killed."""


def run_suite(
    problems: list[str],
    tasks: list[str] | None = None,
    *,
    device: str = "cpu",
    repeats: int = 7,
    warmup: int = 2,
    quick: bool = False,
    memory: bool = True,
    compare: bool = True,
    threads: int | None = None,
    clock: str = "wall",
    task_timeout: float | None = DEFAULT_TASK_TIMEOUT,
    resume: Results | None = None,
    on_update: Callable[[Results], None] | None = None,
) -> Results:
    """Measure every task on every problem.

    NOTE [a run that survives limits]: each task's rows are handed to ``on_update`` as soon as
    they are measured (the command line rewrites ``RESULTS.json`` and the report atomically
    then), so a run cut by a time limit keeps every finished task, and ``resume`` skips them
    in the next run. With a ``task_timeout``, each task is timed in its own child process
    (forked from the fork server of :mod:`benchmarks.memory`, which builds the problem from
    its fixed seed again); a task that has not finished in time is killed and recorded with
    the error ``"timeout (> T s)"`` for every implementation, and the run goes on.

    Args:
        problems: Problem names.
        tasks: Task names (default: all).
        device: ``"cpu"`` or ``"cuda"``.
        repeats: Timed repeats per task.
        warmup: Untimed calls before timing.
        quick: Tiny problem sizes (smoke test).
        memory: Measure peak memory (one child process per task and implementation).
        compare: Include curvlinops if it is installed.
        threads: ``torch.set_num_threads`` (default: PyTorch's default).
        clock: ``"wall"`` or ``"cpu"`` time (:mod:`benchmarks.timing`).
        task_timeout: Seconds per task (timing of both libraries; each memory child gets
            the same limit); ``None`` or ``0``: no limit, timed in this process.
        resume: Results of an earlier run: its rows are kept and their tasks not measured
            again (a task counts as measured once it has a row, timeouts and errors included).
        on_update: Called with the results after every task.

    Returns:
        The results.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dev = torch.device(device)
    with_kfac = kfac_available()
    compare = compare and curvlinops_available()
    impls = [i for i in IMPLEMENTATIONS if i == "curvops" or compare]
    chosen = [t for t in TASKS if (t.in_default_run if tasks is None else t.name in tasks)]
    config = {
        "device": device,
        "repeats": repeats,
        "warmup": warmup,
        "clock": clock,
        "quick": quick,
        "kfac": with_kfac,
        "curvlinops": compare,
        "task_timeout": task_timeout or None,
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    results = Results(machine=machine_info(dev), config=config)
    if resume is not None:
        results.problems = dict(resume.problems)
        results.measurements = list(resume.measurements)
        config["resumed_from"] = resume.config.get("date")
        if "memory_method" in resume.config:
            config["memory_method"] = resume.config["memory_method"]
    done = {(m.problem, m.task) for m in results.measurements}
    options = dict(device=dev, repeats=repeats, warmup=warmup, clock=clock)
    for name in problems:
        todo = [t for t in chosen if (name, t.name) not in done]
        if not todo:
            continue
        problem = make_problem(name, dev, quick=quick)
        num_params = problem.num_params
        results.problems[name] = {
            "description": problem.description,
            "num_params": num_params,
            "num_kfac_params": sum(p.numel() for p in problem.kfac_params),
            "num_data": problem.num_data,
            **{k: v for k, v in results.problems.get(name, {}).items() if k == "gradient_seconds"},
        }
        gradient = None
        if task_timeout:  # the children build their own: free the device for them
            problem = None
        else:
            gradient = setup("gradient", problem, "curvops")
        for task in todo:
            if task.max_params is not None and num_params > task.max_params:
                _log(f"[{name}] {task.name}: skipped (D = {num_params:,} parameters)")
                continue
            if needs_kfac(task.name) and not with_kfac:
                for impl in impls:
                    results.measurements.append(
                        Measurement(name, task.name, impl, error="curvops.kronecker missing")
                    )
                continue
            _log(f"[{name}] {task.name}")
            if problem is None:
                rows = _time_in_child(name, task.name, impls, quick, threads, task_timeout, options)
            else:
                rows = _time_rows(problem, gradient, task.name, impls, **options)
            gc.collect()
            if memory:
                for impl in impls:
                    if rows[impl].error is None and (impl == "curvops" or task.name != "gradient"):
                        out = peak_memory(
                            name,
                            task.name,
                            impl,
                            device=device,
                            quick=quick,
                            threads=threads,
                            timeout=task_timeout or 600.0,
                        )
                        if "error" in out:
                            rows[impl].error = out["error"][:300]
                        else:
                            rows[impl].memory_bytes = out["peak_bytes"]
                            results.config["memory_method"] = out["method"]
            results.measurements.extend(rows.values())
            _summarise(results, name)
            if on_update is not None:
                on_update(results)
        del problem, gradient
        gc.collect()
    return results


def _time_rows(
    problem: Problem,
    gradient: Callable[[], Any] | None,
    task: str,
    impls: list[str],
    **options: Any,
) -> dict[str, Measurement]:
    """Set a task up for each implementation and time it against the gradient."""
    if gradient is None:
        gradient = setup("gradient", problem, "curvops")
    closures, rows = {}, {}
    for impl in impls:
        rows[impl] = Measurement(problem.name, task, impl)
        try:
            closures[impl] = setup(task, problem, impl)
        except Exception as e:  # record and continue with the rest
            rows[impl].error = f"{type(e).__name__}: {e}"[:300]
            closures[impl] = None
    mine = closures["curvops"]
    other = closures.get("curvlinops")
    if other is not None:
        try:  # a failing comparison must not cost the curvops measurement
            other()
        except Exception as e:
            rows["curvlinops"].error = f"{type(e).__name__}: {e}"[:300]
            other = None
    try:
        if mine is not None:
            t_mine, t_other, g = time_task(gradient, mine, other, **options)
            for impl, t in (("curvops", t_mine), ("curvlinops", t_other)):
                if t is not None:
                    rows[impl].seconds, rows[impl].time = t.seconds, t.gradients
                    rows[impl].time_spread = t.spread
                    rows[impl].gradient_seconds = g
            rows["curvops"].vs_curvlinops = t_mine.vs_other
    except Exception as e:
        rows["curvops"].error = f"{type(e).__name__}: {e}"[:300]
    return rows


def _timing_child(request: dict, conn) -> None:
    """Child process of :func:`_time_in_child`: build the problem, time, send the rows."""
    try:
        torch.set_num_threads(request["threads"])
        options = dict(request["options"], device=torch.device(request["options"]["device"]))
        problem = make_problem(request["problem"], options["device"], quick=request["quick"])
        rows = _time_rows(problem, None, request["task"], request["impls"], **options)
        conn.send({impl: asdict(row) for impl, row in rows.items()})
    except Exception as e:  # report, do not hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        conn.close()


def _time_in_child(
    problem: str,
    task: str,
    impls: list[str],
    quick: bool,
    threads: int,
    timeout: float,
    options: dict,
) -> dict[str, Measurement]:
    """:func:`_time_rows` in a child process that is killed after ``timeout`` seconds."""
    ctx = fork_context()
    receiver, sender = ctx.Pipe(duplex=False)
    request = {
        "problem": problem,
        "task": task,
        "impls": impls,
        "quick": quick,
        "threads": threads,
        "options": dict(options, device=str(options["device"])),
    }
    proc = ctx.Process(target=_timing_child, args=(request, sender))
    proc.start()
    sender.close()
    answer: dict = {"error": "the child process crashed without an answer"}
    if receiver.poll(timeout):
        try:
            answer = receiver.recv()
        except EOFError:
            pass
    else:
        answer = {"error": timeout_text(timeout)}
        _log(f"[{problem}] {task}: {answer['error']}, child process killed")
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    receiver.close()
    if "error" in answer:
        return {impl: Measurement(problem, task, impl, error=answer["error"]) for impl in impls}
    return {impl: Measurement(**row) for impl, row in answer.items()}


def is_timeout(m: Measurement) -> bool:
    """Whether a measurement ran out of its time limit."""
    return m.error is not None and m.error.startswith("timeout")


def _summarise(results: Results, problem: str) -> None:
    """The problem's median gradient time and the memory in gradients, from its rows."""
    seconds = [
        m.gradient_seconds
        for m in results.measurements
        if m.problem == problem and m.implementation == "curvops" and m.gradient_seconds
    ]
    if problem in results.problems and seconds:
        results.problems[problem]["gradient_seconds"] = statistics.median(seconds)
    _normalise_memory(results, problem)


def _normalise_memory(results: Results, problem: str) -> None:
    ref = results.get(problem, "gradient", "curvops")
    if ref is None or not ref.memory_bytes:
        return
    for m in results.measurements:
        if m.problem == problem and m.memory_bytes is not None:
            m.memory = m.memory_bytes / ref.memory_bytes
