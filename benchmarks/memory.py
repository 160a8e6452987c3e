"""Peak memory of one task, isolated in a fresh child process.

Each measurement runs in its own process, forked from a ``multiprocessing`` fork server that
has only imported the libraries (no computation, no threads started, no CUDA context). The
child builds the problem, sets the task up, calls it once (warm-up: lazy allocations and
caches), then records the baseline, calls it again and records the peak:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` at baseline,
  after ``torch.cuda.reset_peak_memory_stats()`` (method ``"cuda-allocator"``).
* CPU: the increase of the peak resident set size over the resident set size at baseline.
  On Linux the kernel's peak (``VmHWM``) is reset by writing ``5`` to
  ``/proc/self/clear_refs`` first (method ``"VmHWM"``); otherwise
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used (method ``"ru_maxrss"``, only exact
  when the measured call is the process's largest allocation so far; psutil is not used).
  The memory child sets glibc's mmap threshold to 64 KiB (``mallopt``, as
  ``MALLOC_MMAP_THRESHOLD_=65536`` would) so that freed tensors go back to the operating
  system at once and the resident set follows live memory. Only that child: the fork server
  is shared with the timing children of :mod:`benchmarks.runner`, and with the low threshold
  every large allocation is a fresh ``mmap`` whose page faults nearly doubled the CPU time of
  a gradient (CNN: 85 ms against 46 ms), which distorted the suite's timings.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import resource
from typing import Any

import torch

_PRELOAD = ["torch", "curvops", "benchmarks.problems", "benchmarks.tasks"]
_CONTEXT: Any = None
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _return_freed_memory_at_once() -> None:
    """Set glibc's mmap threshold to 64 KiB in this process (no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 65536)


def _child(request: dict, conn) -> None:
    try:
        _return_freed_memory_at_once()
        from benchmarks.problems import make_problem
        from benchmarks.tasks import setup

        torch.set_num_threads(request["threads"])
        device = torch.device(request["device"])
        problem = make_problem(request["problem"], device, quick=request["quick"])
        fn = setup(request["task"], problem, request["implementation"])
        fn()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            result = fn()
            torch.cuda.synchronize(device)
            peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda-allocator"
        elif _reset_peak_rss():
            base = _status_kib("VmRSS")
            result = fn()
            peak, method = (_status_kib("VmHWM") - base) * 1024, "VmHWM"
        else:
            base = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result = fn()
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak, method = max(after - base, 0) * 1024, "ru_maxrss"
        del result
        conn.send({"peak_bytes": float(peak), "method": method})
    except Exception as e:  # report, do not hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def timeout_text(seconds: float) -> str:
    """The error text of a task that ran out of time (the report shows it as "timeout")."""
    return f"timeout (> {seconds:g} s)"


def fork_context():
    """The ``multiprocessing`` fork-server context whose server has imported the libraries."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        preload = list(_PRELOAD)
        try:
            import curvlinops  # noqa: F401

            preload.append("curvlinops")
        except ImportError:
            pass
        _CONTEXT.set_forkserver_preload(preload)
    return _CONTEXT


def peak_memory(
    problem: str,
    task: str,
    implementation: str,
    *,
    device: str,
    quick: bool,
    threads: int,
    timeout: float = 600.0,
) -> dict:
    """Peak memory of one call of a task, measured in a fresh child process.

    Args:
        problem: Problem name.
        task: Task name.
        implementation: ``"curvops"`` or ``"curvlinops"``.
        device: ``"cpu"`` or ``"cuda"``.
        quick: Use the tiny problem sizes.
        threads: ``torch.set_num_threads`` in the child.
        timeout: Seconds to wait for the child.

    Returns:
        ``{"peak_bytes": float, "method": str}`` or ``{"error": str}``.
    """
    ctx = fork_context()
    receiver, sender = ctx.Pipe(duplex=False)
    request = {
        "problem": problem,
        "task": task,
        "implementation": implementation,
        "device": device,
        "quick": quick,
        "threads": threads,
    }
    proc = ctx.Process(target=_child, args=(request, sender))
    proc.start()
    sender.close()
    result = {"error": "the child process crashed without an answer"}
    if receiver.poll(timeout):
        try:
            result = receiver.recv()
        except EOFError:
            pass
    else:
        result = {"error": timeout_text(timeout)}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    receiver.close()
    return result
