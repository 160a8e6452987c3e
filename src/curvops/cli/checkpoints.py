"""Trained weights for ``curvops analyze``: state-dict files and whole pickled models.

NOTE [loading checkpoints safely]: ``torch.load`` unpickles the file. With
``weights_only=True`` (PyTorch's default since 2.6) the unpickler accepts only tensors,
primitive types and containers of them, so a file cannot run code while it is loaded:
this is how ``--weights`` reads a ``state_dict`` (``torch.save(model.state_dict(), path)``),
always. A whole model saved with ``torch.save(model, path)`` is a pickle of arbitrary Python
objects; loading it needs ``weights_only=False``, which executes whatever the file says —
only acceptable for a file you made yourself or fully trust. The command line therefore
loads whole models only with the explicit ``--trust-pickle`` flag, and recommends saving
state dicts instead.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvops.cli.errors import CLIError

MODEL_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")
"""File endings that make ``--model`` a saved whole model rather than a factory."""

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
"""Entries of a checkpoint dictionary searched for the model's state dict."""

_SAVE_STATE_DICT = (
    "save the weights with torch.save(model.state_dict(), path) and pass --model "
    "MODULE:FACTORY --weights path"
)


def is_model_file(spec: str) -> bool:
    """Whether ``--model`` names a saved model file rather than a factory.

    Args:
        spec: The option's value.

    Returns:
        ``True`` if the file name ends in one of :data:`MODEL_FILE_SUFFIXES` and contains no
        ``:`` (a factory is ``MODULE:FACTORY`` or ``FILE.py:FACTORY``).
    """
    name = Path(spec).name
    return ":" not in name and Path(name).suffix.lower() in MODEL_FILE_SUFFIXES


def _existing(path_str: str, option: str) -> Path:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise CLIError(f"{option} {path_str!r}: file does not exist.")
    return path


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _describe_keys(obj: dict) -> str:
    keys = [str(k) for k in obj]
    shown = ", ".join(keys[:8])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_state_dict(path_str: str, key: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from a file, never executing code from it.

    Loads with ``torch.load(weights_only=True)`` (NOTE [loading checkpoints safely]). The
    file holds either a state dict (``torch.save(model.state_dict(), path)``) or a
    checkpoint dictionary with the state dict under ``key`` or, if ``key`` is ``None``,
    under one of :data:`STATE_DICT_KEYS`.

    Args:
        path_str: Path of the file.
        key: Entry of a checkpoint dictionary that holds the state dict.

    Returns:
        The state dict (tensors on the CPU).

    Raises:
        CLIError: If the file does not exist, holds Python objects other than tensors (e.g.
            a whole pickled model), or no state dict is found in it.
    """
    path = _existing(path_str, "--weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CLIError(
            f"--weights {path_str!r} holds Python objects other than tensors (e.g. a whole model "
            "saved with torch.save(model, path)), which safe loading (weights_only=True) "
            "refuses because unpickling them can run arbitrary code. To fix it, "
            f"{_SAVE_STATE_DICT}; or, for a file you trust, pass it as --model FILE "
            "--trust-pickle."
        ) from e
    except Exception as e:  # corrupt files, not a torch file, ...
        raise CLIError(
            f"--weights {path_str!r}: torch.load failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Pass a file written by "
            "torch.save(model.state_dict(), path)."
        ) from e
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            available = _describe_keys(obj) if isinstance(obj, dict) else type(obj).__name__
            raise CLIError(
                f"--weights-key {key!r} is not an entry of {path_str!r} (it has: {available})."
            )
        obj = obj[key]
        if not _is_state_dict(obj):
            raise CLIError(
                f"entry {key!r} of {path_str!r} is not a state dict (a dictionary of tensors)."
            )
        return obj
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        found = [k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))]
        if found:
            return obj[found[0]]
        raise CLIError(
            f"--weights {path_str!r} is a dictionary without a state dict among its entries "
            f"({_describe_keys(obj)}). Name the entry that holds the model's state dict with "
            "--weights-key."
        )
    raise CLIError(
        f"--weights {path_str!r} holds a {type(obj).__name__}, not a state dict. To fix it, "
        f"{_SAVE_STATE_DICT}."
    )


def apply_state_dict(model: nn.Module, state_dict: dict[str, Tensor], path_str: str) -> None:
    """Load a state dict into the model built by the factory (all entries must match).

    Args:
        model: The model.
        state_dict: Its trained weights.
        path_str: The file they came from, for the messages.

    Raises:
        CLIError: If names or shapes do not match the model.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = (
                " The names start with 'module.': the weights were saved from a DataParallel or "
                "DistributedDataParallel wrapper; save model.module.state_dict() instead."
            )
        raise CLIError(
            f"the weights in {path_str!r} do not fit the model: missing "
            f"{_describe_keys(dict.fromkeys(missing)) or 'none'}; unexpected "
            f"{_describe_keys(dict.fromkeys(unexpected)) or 'none'}. Check that --model builds "
            f"the architecture the weights were trained with.{hint}"
        )
    for name, value in own.items():
        if tuple(state_dict[name].shape) != tuple(value.shape):
            raise CLIError(
                f"the weights in {path_str!r} do not fit the model: {name!r} has shape "
                f"{tuple(state_dict[name].shape)} in the file but {tuple(value.shape)} in the "
                "model. Check that --model builds the architecture the weights were trained "
                "with."
            )
    with torch.no_grad():
        model.load_state_dict(state_dict)


def load_model_file(path_str: str, *, trust_pickle: bool) -> nn.Module:
    """Load a whole model saved with ``torch.save(model, path)``.

    Args:
        path_str: Path of the file.
        trust_pickle: Whether the user allowed unpickling arbitrary objects (NOTE [loading
            checkpoints safely]).

    Returns:
        The model.

    Raises:
        CLIError: Without ``trust_pickle``, if the file does not exist, cannot be unpickled
            (e.g. its class is not importable here) or is not a module.
    """
    path = _existing(path_str, "--model")
    if not trust_pickle:
        raise CLIError(
            f"--model {path_str!r} is a saved whole model: loading it unpickles arbitrary Python "
            "objects (torch.load(weights_only=False)), which can run any code the file "
            "contains. Pass --trust-pickle if you made the file yourself or trust it; or, "
            f"safer, {_SAVE_STATE_DICT}."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise CLIError(
            f"--model {path_str!r}: the pickled model refers to code that cannot be imported "
            f"here ({type(e).__name__}: {e}). Make the module that defines the model's class "
            f"importable (e.g. run from its directory), or {_SAVE_STATE_DICT}."
        ) from e
    except Exception as e:
        raise CLIError(
            f"--model {path_str!r}: torch.load failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})."
        ) from e
    if _is_state_dict(obj):
        raise CLIError(
            f"--model {path_str!r} holds a state dict (tensors only), not a whole model: pass "
            "it as --weights, with --model MODULE:FACTORY building the architecture."
        )
    if not isinstance(obj, nn.Module):
        raise CLIError(
            f"--model {path_str!r} holds a {type(obj).__name__}, not a torch.nn.Module. Save "
            "the model with torch.save(model, path), or better its state dict (see --weights)."
        )
    return obj
