"""Wall-clock timing of operator work (synchronising the accelerator when there is one)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def timed(fn: Callable[..., T], device: torch.device, *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Run ``fn(*args, **kwargs)`` and measure its wall-clock time.

    Args:
        fn: The work to time.
        device: Device the work runs on (CUDA work is synchronised before reading the clock).
        *args: Positional arguments of ``fn``.
        **kwargs: Keyword arguments of ``fn``.

    Returns:
        ``fn``'s result and the elapsed seconds.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync()
    return result, time.perf_counter() - start
