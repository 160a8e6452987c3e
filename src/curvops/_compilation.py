r"""``torch.compile`` plumbing shared by the operators: options, private caches, eager regions.

NOTE [compiling products]: two ways to compile, which combine.

* ``torch.compile(lambda v: A @ v)`` (any operator): the data loop, the locks, the checks and
  the autograd-based eager products run *eagerly* inside the compiled function (they are
  wrapped in :func:`eager_region`, i.e. ``torch.compiler.disable``): the result equals the
  eager product, and cheap operator algebra around it (structured Kronecker products,
  sums, scaling) is compiled. Without these eager regions Dynamo traced into the products
  and failed (second-order autograd through an AOTAutograd graph; frozen dataclasses built
  during tracing).
* ``compile=True`` on a curvature operator (:class:`~curvops.GGNLinearOperator`, Hessian,
  empirical and Monte-Carlo Fisher): the per-batch product becomes a pure ``torch.func``
  program (:mod:`curvops.curvature.compiled`) compiled ONCE per operator and reused for every
  batch and every product. It recompiles only for a new shape: a new batch size (e.g. the
  last, smaller batch), or a new number of columns per pass. The columns of a product are
  padded to 1, 2, 4 or 8 per pass (:func:`column_passes`), so that a stream of products with
  arbitrary column counts needs at most four specialisations per batch shape.
  ``dynamic=False`` is the default (static shapes give Inductor its best kernels, and a data
  set has few batch shapes); pass ``compile_options={"dynamic": None}`` to let PyTorch mark
  the batch dimension dynamic after its first recompile instead.

Each operator compiles its own copy of the product's code object (:func:`private_copy`):
Dynamo keeps its cache of compiled graphs per code object and falls back to eager mode (with
a warning) after ``torch._dynamo.config.recompile_limit`` (8) entries; with a shared code
object, every new operator (each guards on its own model) would use up the same budget.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

COMPILED_COLUMN_PASS = 8
"""Most columns of one compiled per-batch pass (its memory: that many tangents)."""

DEFAULT_COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}
"""``torch.compile`` keyword arguments used unless ``compile_options`` overrides them."""

_TORCH_COMPILE_KEYWORDS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def check_compile_options(
    compile: bool, compile_options: dict[str, Any] | None, owner: str
) -> dict[str, Any] | None:
    """Validate the ``compile`` and ``compile_options`` arguments of an operator.

    Args:
        compile: Whether to compile the per-batch product.
        compile_options: Keyword arguments for ``torch.compile`` (or ``None``).
        owner: The operator's name, for error messages.

    Returns:
        The ``torch.compile`` keyword arguments to use, or ``None`` if not compiling.

    Raises:
        TypeError: If ``compile`` is not a bool or ``compile_options`` not a dict.
        ValueError: If ``compile_options`` holds a keyword ``torch.compile`` does not take,
            or is given without ``compile=True``.
    """
    if not isinstance(compile, bool):
        raise TypeError(f"{owner}: compile must be True or False, got {compile!r}.")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise TypeError(
            f"{owner}: compile_options must be a dict of torch.compile keyword arguments "
            f"(e.g. {{'mode': 'max-autotune'}}), got {type(compile_options).__name__}."
        )
    if compile_options and not compile:
        raise ValueError(
            f"{owner}: compile_options={compile_options!r} has no effect without compile=True; "
            "pass compile=True as well, or drop compile_options."
        )
    unknown = sorted(set(compile_options or {}) - set(_TORCH_COMPILE_KEYWORDS))
    if unknown:
        raise ValueError(
            f"{owner}: compile_options has keywords torch.compile does not take: {unknown}; "
            f"allowed are {list(_TORCH_COMPILE_KEYWORDS)}."
        )
    if not compile:
        return None
    return DEFAULT_COMPILE_OPTIONS | dict(compile_options or {})


def private_copy(fn: F) -> F:
    """``fn`` with its own code object, so that Dynamo's cache for it is private.

    Args:
        fn: A plain Python function (possibly a closure).

    Returns:
        A function with the same behaviour, globals, defaults and closure, whose code object
        is a fresh copy (NOTE [compiling products]).
    """
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy  # type: ignore[return-value]


def compile_function(fn: F, options: dict[str, Any]) -> F:
    """``torch.compile`` a private copy of ``fn`` (see :func:`private_copy`)."""
    return torch.compile(private_copy(fn), **options)  # type: ignore[return-value]


def column_passes(K: int, most: int = COMPILED_COLUMN_PASS) -> Iterator[tuple[int, int, int]]:
    """Split ``K`` columns into passes of a few fixed widths.

    Args:
        K: Number of columns.
        most: Widest pass (columns per pass, a power of two).

    Yields:
        ``(start, size, width)``: columns ``start : start + size`` go into a pass ``width``
        columns wide (``width - size`` zero columns of padding), ``width`` a power of two
        ``<= most``.
    """
    start = 0
    while start < K:
        size = min(most, K - start)
        width = 1
        while width < size:
            width *= 2
        yield start, size, width
        start += size


def eager_region(fn: F) -> F:
    """Run ``fn`` eagerly even inside a compiled function (``torch.compiler.disable``).

    Compiled functions called from inside ``fn`` (``compile=True`` products) still run
    compiled (NOTE [compiling products]). ``torch.compiler.disable`` imports Dynamo (seconds);
    it is applied at the first call after Dynamo was imported by someone (before that nothing
    can be compiling), so ``import curvops`` stays as fast as without it.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:  # nothing can be compiling
            return fn(*args, **kwargs)
        return _disabled(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_DISABLED: dict[Callable[..., Any], Callable[..., Any]] = {}


def _disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, made once per function."""
    disabled = _DISABLED.get(fn)
    if disabled is None:
        disabled = _DISABLED[fn] = torch.compiler.disable(fn)
    return disabled
