"""Progress of the command line: one bar over counted steps, and product counting.

NOTE [command-line progress]: each command shows ONE progress bar on stderr whose total is
the number of steps of the whole run, counted up front, with a label saying what runs now
(e.g. ``operators: Hessian dense 2/4``). Steps are small (a block of columns of a dense
matrix, one estimator, one epoch), so the bar never sits still for long. Nested bars (the
operators' per-batch bars) are shown only on an interactive terminal: tqdm closes a nested
bar by moving the cursor up with an escape sequence, which ends up verbatim in a log file.
When stderr is not a terminal the bar uses ASCII characters and refreshes at most every few
seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from torch import Tensor
from tqdm.auto import tqdm

from curvops.linear_operator import LinearOperator


def is_interactive(stream: IO[str] | None = None) -> bool:
    """Whether a stream (default: ``sys.stderr``) is an interactive terminal.

    Args:
        stream: The stream.

    Returns:
        ``True`` for a terminal, ``False`` for files, pipes and captured streams.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


class StepBar:
    """One progress bar over the counted steps of a command (NOTE [command-line progress]).

    Args:
        total: Number of steps of the whole run.
        desc: Text in front of the bar.
        enabled: Whether to show the bar at all.
        file: Stream to write to (default: ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, file: IO[str] | None = None):
        self._file = sys.stderr if file is None else file
        interactive = is_interactive(self._file)
        self._bar = tqdm(
            total=total,
            desc=desc,
            disable=not enabled,
            file=self._file,
            ascii=None if interactive else True,
            mininterval=0.1 if interactive else 3.0,
            dynamic_ncols=interactive,
        )
        self._label = ""
        self._shown = 0.0

    @property
    def count(self) -> int:
        """Steps done so far."""
        return int(self._bar.n)

    @property
    def total(self) -> int:
        """Steps of the whole run."""
        return int(self._bar.total)

    def label(self, text: str, *, force: bool = False) -> None:
        """Say what runs now (refreshed at most twice a second unless ``force``).

        Args:
            text: The label, e.g. ``"operators: GGN dense 1/4"``.
            force: Refresh the bar even if it was refreshed a moment ago.
        """
        self._label = text
        now = time.monotonic()
        if force or now - self._shown > 0.5:
            self._bar.set_postfix_str(text, refresh=True)
            self._shown = now
        else:
            self._bar.set_postfix_str(text, refresh=False)

    def step(self, n: int = 1) -> None:
        """Mark ``n`` steps as done.

        Args:
            n: Number of steps.
        """
        self._bar.update(n)

    def close(self) -> None:
        """Close the bar (leaving it on screen)."""
        self._bar.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CountedOperator(LinearOperator):
    """An operator that counts the columns it is multiplied with, and reports each product.

    Used to show progress inside long matrix-free computations (Lanczos, estimators) and to
    record how many products each analysis needed. Products (and adjoint products) are
    delegated unchanged; the flags ``is_self_adjoint`` and ``is_psd`` are copied.

    Args:
        A: The operator to wrap.
        on_product: Called with the number of columns after each product.
    """

    def __init__(self, A: LinearOperator, on_product: Callable[[int], None] | None = None):
        super().__init__(A.in_shapes, A.out_shapes, dtype=A.dtype, device=A.device)
        self._A = A
        self._on_product = on_product
        self.is_self_adjoint = A.is_self_adjoint
        self.is_psd = A.is_psd
        self.columns = 0

    def _count(self, X: list[Tensor]) -> None:
        k = int(X[0].shape[-1])
        self.columns += k
        if self._on_product is not None:
            self._on_product(k)

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        out = self._A._matmat(X)
        self._count(X)
        return out

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        out = self._A.adjoint()._matmat(X)
        self._count(X)
        return out
