"""Turn ``--model``/``--data``/``--loss`` into a checked ``(model, loss, params, data)``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from curvops.cli.checkpoints import (
    apply_state_dict,
    is_model_file,
    load_model_file,
    load_state_dict,
)
from curvops.cli.errors import CLIError
from curvops.cli.loading import call_factory, load_factory


class LossName(str, Enum):
    """Losses of the ``--loss`` option.

    Attributes:
        MSE: ``nn.MSELoss()``; targets shaped like the outputs.
        CE: ``nn.CrossEntropyLoss()``; outputs ``[N, C, ...]``, integer targets ``[N, ...]``.
        BCE: ``nn.BCEWithLogitsLoss()``; targets in ``[0, 1]`` shaped like the outputs.
    """

    MSE = "mse"
    CE = "ce"
    BCE = "bce"


def parse_loss(name: str) -> nn.Module:
    """Create the loss module of a ``--loss`` value (``reduction="mean"``).

    Args:
        name: ``"mse"``, ``"ce"`` or ``"bce"``.

    Returns:
        The loss module.

    Raises:
        CLIError: For an unknown name.
    """
    try:
        loss = LossName(name)
    except ValueError:
        allowed = "|".join(m.value for m in LossName)
        raise CLIError(f"unknown loss {name!r}; use one of {allowed}.") from None
    return {
        LossName.MSE: nn.MSELoss,
        LossName.CE: nn.CrossEntropyLoss,
        LossName.BCE: nn.BCEWithLogitsLoss,
    }[loss]()


class CastBatches:
    """A re-iterable view of ``(X, y)`` batches with floating tensors cast to one dtype/device.

    Integer targets (class labels) keep their dtype. The underlying data is never modified.

    Args:
        data: The user's re-iterable of batches.
        dtype: Floating-point type for inputs (and floating targets).
        device: Target device.
    """

    def __init__(self, data: Iterable, dtype: torch.dtype, device: torch.device):
        self._data, self._dtype, self._device = data, dtype, device

    def _cast(self, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if t.is_floating_point():
            return t.to(device=self._device, dtype=self._dtype)
        return t.to(self._device)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """Iterate over the cast batches."""
        for batch in self._data:
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                yield self._cast(batch[0]), self._cast(batch[1])
            else:
                yield batch


class SizedCastBatches(CastBatches):
    """:class:`CastBatches` of data that knows its number of batches (for progress bars)."""

    def __len__(self) -> int:
        """Number of batches."""
        return len(self._data)


def cast_batches(data: Iterable, dtype: torch.dtype, device: torch.device) -> CastBatches:
    """Wrap data in :class:`SizedCastBatches` if it has a length, else :class:`CastBatches`.

    Args:
        data: The user's re-iterable of batches.
        dtype: Floating-point type for inputs (and floating targets).
        device: Target device.

    Returns:
        The cast view.
    """
    cls = SizedCastBatches if hasattr(data, "__len__") else CastBatches
    return cls(data, dtype, device)


@dataclass
class Setup:
    """A checked analysis set-up.

    Attributes:
        model: The model (in eval mode, cast to the requested dtype and device).
        loss_func: The loss module.
        params: The trainable parameters.
        data: Re-iterable of cast ``(X, y)`` batches.
        num_data: Number of data.
    """

    model: nn.Module
    loss_func: nn.Module
    params: list[Tensor]
    data: CastBatches
    num_data: int


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"shape {tuple(t.shape)} ({str(t.dtype).replace('torch.', '')})"
    return type(t).__name__


def _check_fit(output: Tensor, y: Tensor, loss_func: nn.Module) -> None:
    """Check that model output and targets fit the loss (beyond what the loss itself checks)."""
    name = type(loss_func).__name__
    fix = "Change the model's last layer or the targets so that they fit, or choose another --loss."
    if name == "CrossEntropyLoss":
        if output.ndim < 2:
            raise CLIError(
                f"the model's output has shape {tuple(output.shape)}, but --loss ce needs "
                f"[N, C, ...] logits. {fix}"
            )
        if y.is_floating_point() or y.shape != output.shape[:1] + output.shape[2:]:
            raise CLIError(
                f"--loss ce needs integer class labels of shape "
                f"{tuple(output.shape[:1] + output.shape[2:])} for model outputs of shape "
                f"{tuple(output.shape)}; got targets of {_describe(y)}. {fix}"
            )
    elif output.shape != y.shape:
        raise CLIError(
            f"the model's output has shape {tuple(output.shape)} but the targets have shape "
            f"{tuple(y.shape)}; {name} needs equal shapes. {fix}"
        )


def probe(model: nn.Module, loss_func: nn.Module, data: Iterable) -> None:
    """Run the model and loss on the first batch to catch misfits early.

    Args:
        model: The model.
        loss_func: The loss.
        data: The (cast) batches.

    Raises:
        CLIError: If the data is empty or not made of pairs, the forward pass fails, or the
            output does not fit the loss.
    """
    first = next(iter(data), None)
    if first is None:
        raise CLIError("the data factory returned no batches. Return at least one (X, y) batch.")
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise CLIError(
            f"each batch must be a pair (X, y), but the first batch is a "
            f"{type(first).__name__}. Make the data factory return e.g. a list of (X, y) tuples."
        )
    X, y = first
    with torch.no_grad():
        try:
            output = model(X)
        except Exception as e:  # the user's model may raise anything
            raise CLIError(
                f"the model's forward pass on the first batch (inputs of {_describe(X)}) raised "
                f"{type(e).__name__}: {str(e).splitlines()[0]}. Check that the data fits the "
                "model's input layer."
            ) from e
        if not isinstance(output, Tensor):
            raise CLIError(
                f"the model returned a {type(output).__name__}, not a tensor. Wrap it so that "
                "forward returns the prediction tensor."
            )
        if not isinstance(y, Tensor):
            raise CLIError(
                f"the targets of the first batch are a {type(y).__name__}, not a tensor."
            )
        _check_fit(output, y, loss_func)
        try:
            loss_func(output, y)
        except Exception as e:
            raise CLIError(
                f"the model's output ({_describe(output)}) does not fit "
                f"{type(loss_func).__name__} with targets of {_describe(y)}: "
                f"{str(e).splitlines()[0]}. Change the model's last layer or the targets, or "
                "choose another --loss."
            ) from e


def load_model(
    model_spec: str,
    *,
    weights: str | None = None,
    weights_key: str | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the model of ``--model`` and load ``--weights`` into it.

    Args:
        model_spec: ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` of a function returning an
            ``nn.Module``, or a file with a whole model saved by ``torch.save(model, path)``
            (loaded only with ``trust_pickle``; NOTE [loading checkpoints safely] in
            :mod:`curvops.cli.checkpoints`).
        weights: A file with a state dict (or a checkpoint dictionary holding one) to load
            into the model, read safely with ``torch.load(weights_only=True)``.
        weights_key: Entry of the checkpoint dictionary that holds the state dict.
        trust_pickle: Allow loading a whole pickled model.

    Returns:
        The model (not yet cast or moved).

    Raises:
        CLIError: For every problem with the factory or the files.
    """
    if weights_key is not None and weights is None:
        raise CLIError("--weights-key needs --weights (the file the key refers to).")
    if is_model_file(model_spec):
        model = load_model_file(model_spec, trust_pickle=trust_pickle)
    else:
        model = call_factory(load_factory(model_spec, "model"), model_spec)
        if not isinstance(model, nn.Module):
            raise CLIError(
                f"{model_spec!r} returned a {type(model).__name__}, not a torch.nn.Module. The "
                "model factory must return the model."
            )
    if weights is not None:
        apply_state_dict(model, load_state_dict(weights, weights_key), weights)
    return model


def prepare(
    model_spec: str,
    data_spec: str,
    loss: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    weights: str | None = None,
    weights_key: str | None = None,
    trust_pickle: bool = False,
) -> Setup:
    """Import the user's factories, build model and data, and check that they fit the loss.

    Args:
        model_spec: ``MODULE:FACTORY`` of a function returning an ``nn.Module``, or a saved
            whole model (see :func:`load_model`).
        data_spec: ``MODULE:FACTORY`` of a function returning a re-iterable of ``(X, y)``.
        loss: ``"mse"``, ``"ce"`` or ``"bce"``.
        dtype: Floating-point type of the analysis.
        device: Device of the analysis.
        weights: A state-dict file to load into the model (see :func:`load_model`).
        weights_key: Entry of a checkpoint dictionary that holds the state dict.
        trust_pickle: Allow loading a whole pickled model.

    Returns:
        The checked set-up.

    Raises:
        CLIError: For every problem with the factories, the files or their fit.
    """
    loss_func = parse_loss(loss)
    model = load_model(
        model_spec, weights=weights, weights_key=weights_key, trust_pickle=trust_pickle
    )
    raw = call_factory(load_factory(data_spec, "data"), data_spec)
    try:
        iterator = iter(raw)
    except TypeError:
        raise CLIError(
            f"{data_spec!r} returned a {type(raw).__name__}, which is not iterable. Return a "
            "list of (X, y) batches or a DataLoader."
        ) from None
    if iterator is raw:
        raise CLIError(
            f"{data_spec!r} returned a one-shot iterator (e.g. a generator); the analysis "
            "passes over the data many times. Return a list of (X, y) batches or a DataLoader."
        )
    model = model.to(device=device, dtype=dtype).eval()
    data = cast_batches(raw, dtype, device)
    probe(model, loss_func, data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CLIError("the model has no trainable parameters (requires_grad=True).")
    num_data = sum(X.shape[0] for X, _ in data)
    return Setup(model, loss_func, params, data, num_data)
