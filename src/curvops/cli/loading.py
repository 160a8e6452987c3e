"""Import user factories given as ``MODULE:FACTORY`` or ``path/to/file.py:FACTORY``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curvops.cli.errors import CLIError


def _is_path(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def _import_file(path_str: str, spec: str) -> Any:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise CLIError(
            f"{spec!r}: file {str(path)!r} does not exist. Pass an existing Python file as "
            f"FILE.py:FACTORY, or an importable module as MODULE:FACTORY."
        )
    name = f"_curvops_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"{spec!r}: cannot load {str(path)!r} as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code may raise anything
        sys.modules.pop(name, None)
        raise CLIError(
            f"{spec!r}: executing {str(path)!r} raised {type(e).__name__}: {e}. Fix the error in "
            "that file."
        ) from e
    return module


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise CLIError(
            f"{spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). Make it "
            "importable (install it or run from its directory), or pass a file as "
            "FILE.py:FACTORY."
        ) from e
    except Exception as e:  # the user's module may raise anything on import
        raise CLIError(
            f"{spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}. Fix the error "
            "in that module."
        ) from e


def load_factory(spec: str, what: str) -> Callable[[], Any]:
    """Resolve ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` to the callable it names.

    Args:
        spec: The specification. The part before the last ``:`` is a module name (imported
            with :func:`importlib.import_module`) or, if it ends with ``.py`` or contains a
            path separator, a file path. The part after it is an attribute name, possibly
            dotted (``module:Class.method``).
        what: What the factory builds (``"model"``, ``"data"``), for the messages.

    Returns:
        The callable.

    Raises:
        CLIError: If the specification is malformed, the module cannot be imported, the
            attribute does not exist, or it is not callable.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise CLIError(
            f"--{what} {spec!r} is not of the form MODULE:FACTORY or FILE.py:FACTORY (e.g. "
            f"'my_models:build_{what}' or 'experiments/setup.py:make_{what}')."
        )
    module = (
        _import_file(module_part, spec)
        if _is_path(module_part)
        else _import_module(module_part, spec)
    )
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n in dir(module) if not n.startswith("_"))
            raise CLIError(
                f"{spec!r}: {module_part!r} has no attribute {attr!r}. Available names: "
                f"{', '.join(available) or '(none)'}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(
            f"{spec!r}: {attr!r} is a {type(obj).__name__}, not callable. The {what} factory "
            f"must be a function taking no arguments that returns the {what}."
        )
    return obj


def call_factory(factory: Callable[[], Any], spec: str) -> Any:
    """Call a user factory without arguments, turning its exceptions into a clear error.

    Args:
        factory: The factory.
        spec: Its specification, for the message.

    Returns:
        What the factory returns.

    Raises:
        CLIError: If calling the factory raises.
    """
    try:
        return factory()
    except Exception as e:  # the user's code may raise anything
        raise CLIError(
            f"{spec!r}: calling the factory raised {type(e).__name__}: {e}. Factories are "
            "called without arguments; fix the factory or wrap it in one that takes none."
        ) from e
