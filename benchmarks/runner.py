"""Run the suite: every task on every problem, time and peak memory, both libraries."""

from __future__ import annotations

import gc
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.memory import peak_memory
from benchmarks.problems import make_problem
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
) -> Results:
    """Measure every task on every problem.

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
    results = Results(
        machine=machine_info(dev),
        config={
            "device": device,
            "repeats": repeats,
            "warmup": warmup,
            "clock": clock,
            "quick": quick,
            "kfac": with_kfac,
            "curvlinops": compare,
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
    )
    for name in problems:
        problem = make_problem(name, dev, quick=quick)
        gradient = setup("gradient", problem, "curvops")
        results.problems[name] = {
            "description": problem.description,
            "num_params": problem.num_params,
            "num_kfac_params": sum(p.numel() for p in problem.kfac_params),
            "num_data": problem.num_data,
        }
        grad_seconds = []
        for task in chosen:
            if task.max_params is not None and problem.num_params > task.max_params:
                _log(f"[{name}] {task.name}: skipped (D = {problem.num_params:,} parameters)")
                continue
            if needs_kfac(task.name) and not with_kfac:
                for impl in impls:
                    results.measurements.append(
                        Measurement(name, task.name, impl, error="curvops.kronecker missing")
                    )
                continue
            _log(f"[{name}] {task.name}")
            closures, rows = {}, {}
            for impl in impls:
                rows[impl] = Measurement(name, task.name, impl)
                try:
                    closures[impl] = setup(task.name, problem, impl)
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
                    t_mine, t_other, g = time_task(
                        gradient,
                        mine,
                        other,
                        device=dev,
                        repeats=repeats,
                        warmup=warmup,
                        clock=clock,
                    )
                    grad_seconds.append(g)
                    for impl, t in (("curvops", t_mine), ("curvlinops", t_other)):
                        if t is not None:
                            rows[impl].seconds, rows[impl].time = t.seconds, t.gradients
                            rows[impl].time_spread = t.spread
                    rows["curvops"].vs_curvlinops = t_mine.vs_other
            except Exception as e:
                rows["curvops"].error = f"{type(e).__name__}: {e}"[:300]
            del closures, mine, other
            gc.collect()
            if memory:
                for impl in impls:
                    if rows[impl].error is None and (impl == "curvops" or task.name != "gradient"):
                        out = peak_memory(
                            name, task.name, impl, device=device, quick=quick, threads=threads
                        )
                        if "error" in out:
                            rows[impl].error = out["error"][:300]
                        else:
                            rows[impl].memory_bytes = out["peak_bytes"]
                            results.config["memory_method"] = out["method"]
            results.measurements.extend(rows.values())
        results.problems[name]["gradient_seconds"] = (
            sorted(grad_seconds)[len(grad_seconds) // 2] if grad_seconds else None
        )
        _normalise_memory(results, name)
        del problem, gradient
        gc.collect()
    return results


def _normalise_memory(results: Results, problem: str) -> None:
    ref = results.get(problem, "gradient", "curvops")
    if ref is None or not ref.memory_bytes:
        return
    for m in results.measurements:
        if m.problem == problem and m.memory_bytes is not None:
            m.memory = m.memory_bytes / ref.memory_bytes
