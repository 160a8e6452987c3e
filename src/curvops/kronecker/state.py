"""Checked loading of saved Kronecker factors (``state_dict`` / ``load_state_dict``).

A state holds the options the factors were computed with, the factor tensors per layer and the
fallback diagonals per parameter. Loading refuses a state from another operator type or
version, other options or parameters, other layers, or tensors of the wrong shapes, naming
what differs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.layers import KFACLayer

STATE_VERSION = 1


def check_state_header(state: Any, type_name: str, config: dict[str, Any]) -> None:
    """Check a state's type, version and options against the loading operator's.

    Args:
        state: The state to load.
        type_name: Class name of the loading operator.
        config: The loading operator's options (``param_shapes`` as tuples).

    Raises:
        ValueError: If the type, version or an option differs.
    """
    if not isinstance(state, dict) or state.get("type") != type_name:
        got = state.get("type") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"Expected a state_dict of a {type_name}, got one of {got}.")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"State version {state.get('version')} is not supported (expected {STATE_VERSION})."
        )
    for key, value in config.items():
        theirs = state["config"].get(key)
        if key == "param_shapes" and theirs is not None:
            theirs = [tuple(s) for s in theirs]
        if theirs != value:
            raise ValueError(
                f"The state was computed with {key}={theirs!r}, but this operator has "
                f"{key}={value!r}. Construct the operator with the same options and parameters."
            )


def expected_factor_shapes(
    layer: KFACLayer, separate_weight_and_bias: bool
) -> dict[str, tuple[int, ...]]:
    """Shapes of the factor tensors a layer stores (see :class:`LayerFactors`)."""
    d_out, d_in = layer.weight_matrix_shape
    has_w, has_b = layer.weight_index is not None, layer.bias_index is not None
    joint = has_w and has_b and not separate_weight_and_bias
    shapes = {"gradient_factor": (d_out, d_out)}
    if has_w:
        n = d_in + int(joint)
        shapes["input_factor"] = (n,) if layer.diagonal_input else (n, n)
    if has_b and not joint:
        shapes["bias_input_factor"] = ()
    return shapes


def factors_from_state(
    state: dict[str, Any],
    layers: list[KFACLayer],
    names: list[str],
    *,
    separate_weight_and_bias: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, LayerFactors]:
    """Rebuild the layers' factors from a state, checking layers and shapes.

    Args:
        state: The state (header already checked).
        layers: The loading operator's layers.
        names: Parameter names by position.
        separate_weight_and_bias: The loading operator's option.
        dtype: Data type of the loaded factors.
        device: Device of the loaded factors.

    Returns:
        The factors by layer name.

    Raises:
        ValueError: If the layers, factor names or shapes differ.
    """
    stored = state["factors"]
    if set(stored) != {layer.name for layer in layers}:
        raise ValueError(
            f"The state holds factors for layers {sorted(stored)}, but this operator has "
            f"layers {sorted(layer.name for layer in layers)}."
        )
    factors = {}
    for layer in layers:
        tensors, shapes = (
            stored[layer.name],
            expected_factor_shapes(layer, separate_weight_and_bias),
        )
        if set(tensors) != set(shapes):
            raise ValueError(
                f"Layer '{layer.name}': the state holds factors {sorted(tensors)}, expected "
                f"{sorted(shapes)}."
            )
        for key, shape in shapes.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"Layer '{layer.name}': {key} has shape {tuple(tensors[key].shape)} in the "
                    f"state, but the layer needs {shape}."
                )
        loaded = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        has_w, has_b = layer.weight_index is not None, layer.bias_index is not None
        factors[layer.name] = LayerFactors(
            module_name=layer.name,
            module_type=layer.type_name,
            weight_name=names[layer.weight_index] if has_w else None,
            bias_name=names[layer.bias_index] if has_b else None,
            joint=has_w and has_b and not separate_weight_and_bias,
            input_factor=loaded.get("input_factor"),
            gradient_factor=loaded["gradient_factor"],
            bias_input_factor=loaded.get("bias_input_factor"),
        )
    return factors


def fallback_diagonals_from_state(
    state: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """Load the fallback diagonals, checking names and shapes.

    Args:
        state: The state (header already checked).
        shapes: Expected shape per fallback parameter name.
        dtype: Data type of the loaded diagonals.
        device: Device of the loaded diagonals.

    Returns:
        The diagonals by parameter name.

    Raises:
        ValueError: If a diagonal is missing or has the wrong shape.
    """
    diagonals = {}
    for name, shape in shapes.items():
        d = state["fallback_diagonals"].get(name)
        if d is None or tuple(d.shape) != tuple(shape):
            raise ValueError(
                f"The state's fallback diagonal of '{name}' is missing or has the wrong shape "
                f"(expected {tuple(shape)})."
            )
        diagonals[name] = d.to(device=device, dtype=dtype)
    return diagonals
