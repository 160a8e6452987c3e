"""Run-time measurement as multiples of one gradient, interleaved to cancel machine load.

Absolute times on a shared machine drift with the load of other processes, so each repeat
times the gradient, the task and its curvlinops counterpart back to back; the reported
multiple is the median over repeats of the per-repeat ratios, after warm-up calls that are
not timed (they also trigger lazy set-up such as a Hessian strategy probe). The order of the
three calls rotates from repeat to repeat, so that no closure always runs right after the
same other one (a call that follows a large allocation or a cache-evicting pass pays for it;
with a fixed order that cost would always fall on the same side of a comparison).

Clocks: ``"wall"`` (``time.perf_counter``, CUDA synchronised) or ``"cpu"`` (the process's CPU
time, ``time.process_time``): on a machine shared with other jobs, CPU time with one thread is
far less sensitive to the others' load (it does not count time the process waits for a core).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    """Timing of one task.

    Attributes:
        seconds: Median run time.
        gradients: Median over repeats of run time / gradient time of the same repeat.
        spread: Half the inter-quartile range of those ratios (noise indicator).
        vs_other: Median per-repeat ratio to the other implementation (``None`` if absent).
    """

    seconds: float
    gradients: float
    spread: float
    vs_other: float | None = None


CLOCKS = ("wall", "cpu")


def _timer(device: torch.device, clock: str) -> Callable[[Callable[[], Any]], float]:
    if clock not in CLOCKS:
        raise ValueError(f"Unknown clock {clock!r}; use one of {CLOCKS}.")
    if clock == "cpu" and device.type == "cuda":
        raise ValueError("clock='cpu' measures CPU time, meaningless for CUDA; use 'wall'.")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = time.perf_counter if clock == "wall" else time.process_time

    def run(fn: Callable[[], Any]) -> float:
        sync()
        start = now()
        fn()
        sync()
        return now() - start

    return run


def _half_iqr(values: list[float]) -> float:
    if len(values) < 4:
        return (max(values) - min(values)) / 2
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2


def time_task(
    gradient: Callable[[], Any],
    task: Callable[[], Any],
    other: Callable[[], Any] | None,
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    clock: str = "wall",
) -> tuple[Timing, Timing | None, float]:
    """Time a task (and optionally the other library's version) against the gradient.

    Args:
        gradient: The reference closure.
        task: The closure to time.
        other: The other implementation's closure, or ``None``.
        device: Device (CUDA is synchronised around each call).
        repeats: Number of timed repeats.
        warmup: Number of untimed calls of each closure first.
        clock: ``"wall"`` or ``"cpu"`` (see the module docstring).

    Returns:
        The task's timing, the other implementation's (or ``None``), and the median gradient
        time of these repeats.
    """
    clock = _timer(device, clock)
    for _ in range(warmup):
        gradient()
        task()
        if other is not None:
            other()
    grads, mine, theirs = [], [], []
    timed = [(gradient, grads), (task, mine)]
    if other is not None:
        timed.append((other, theirs))
    for r in range(repeats):
        # rotate the call order (see the module docstring)
        for fn, times in timed[r % len(timed) :] + timed[: r % len(timed)]:
            times.append(clock(fn))

    def summary(times: list[float], vs: list[float] | None) -> Timing:
        ratios = [t / g for t, g in zip(times, grads)]
        return Timing(
            seconds=statistics.median(times),
            gradients=statistics.median(ratios),
            spread=_half_iqr(ratios),
            vs_other=None if vs is None else statistics.median([a / b for a, b in zip(times, vs)]),
        )

    mine_t = summary(mine, theirs or None)
    theirs_t = summary(theirs, mine) if other is not None else None
    return mine_t, theirs_t, statistics.median(grads)
