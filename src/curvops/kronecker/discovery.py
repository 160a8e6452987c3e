"""Which parameters get Kronecker blocks, which fall back, and which configurations are refused.

The layers are found from the calls of one forward pass on the first batch (NOTE [weight
uses] of :mod:`curvops.kronecker.uses`), for ``nn.Module`` s and callables
``(params, X) -> output`` alike; a module whose parameters all belong to standard linear or
convolution modules needs no forward pass (NOTE [layers of standard modules]).

NOTE [functional tied head]: an embedding's weight may also be used by a functional
``F.linear(h, wte.weight)`` output layer (GPT models without an ``nn.Linear`` head), which
only the forward pass shows; the shortcut skipped it and the statistics pass failed with a
message about "another kind of layer call". Models with an ``nn.Embedding`` are therefore
discovered from one forward pass, which finds both uses and makes the weight one tied
layer (:mod:`curvops.kronecker.tied`), exactly as for an ``nn.Linear`` head sharing the
weight. A parameter gets
Kronecker factors if every use of it is the weight or the bias of a recognised layer call
(``F.linear``, ``F.conv*d``, ``F.embedding``); a weight and a bias form one layer if they are
always used together. A weight used by several calls (tied weights, a layer applied twice)
is one layer whose calls act as shared positions (NOTE [weight sharing] of
:mod:`curvops.kronecker.layers`; an embedding tied to a linear output layer:
:mod:`curvops.kronecker.tied`). Any other parameter (used by another function, or not at
all) uses the fallback the user chose, or raises an error naming the parameter and the
function.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from curvops.kronecker.layers import (
    LAYER_TYPES,
    EmbeddingLayer,
    KFACLayer,
    check_call,
    check_layer_options,
    supported_layer_type,
)
from curvops.kronecker.options import FallbackType
from curvops.kronecker.tied import TiedEmbeddingLinearLayer
from curvops.kronecker.uses import CONV, EMBEDDING, LINEAR, SUPPORTED_USES, Call, UseRecorder
from curvops.risk import EmpiricalRisk

_STANDARD_MODULES = {
    LINEAR: (nn.Linear,),
    CONV: (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    EMBEDDING: (nn.Embedding,),
}


def run_model(risk: EmpiricalRisk, X: Any) -> Any:
    """Evaluate the model on ``X`` with the operator's own parameter tensors.

    A module is called itself; a callable gets the parameters as passed (list or dict), so
    that its layer calls receive the tracked tensors (NOTE [weight uses]).
    """
    if risk.module is not None:
        return risk.module(X)
    return risk.forward(risk.params, X)


def probe_uses(risk: EmpiricalRisk, what: str) -> UseRecorder:
    """Record the uses of every parameter in a forward pass on the first batch.

    Args:
        risk: The data loop.
        what: Name of the operator (progress bar).

    Returns:
        The recorder holding the calls and the unsupported uses.
    """
    recorder = UseRecorder(risk.params, range(len(risk.params)))
    with contextlib.closing(risk.batches(desc=f"{what}: finding layers")) as loop:
        for batch in loop:
            with torch.enable_grad(), recorder.recording():
                run_model(risk, batch.X)
            break
    return recorder


def discover_layers(
    risk: EmpiricalRisk, *, kfac_approx: str, fallback: FallbackType | None, what: str
) -> tuple[list[KFACLayer], list[int]]:
    """Assign every parameter to a layer or to the fallback (one forward pass).

    Args:
        risk: The data loop holding the model and the parameters.
        kfac_approx: ``"expand"`` or ``"reduce"`` (some layers refuse ``"reduce"``).
        fallback: The fallback for parameters without Kronecker structure, or ``None``.
        what: Name of the operator, for error messages.

    Returns:
        The layers (in the model's module order; for a callable, in the order of their
        first calls) and the positions of the parameters using the fallback.

    Raises:
        ValueError: For parameters used by functions other than the layer calls, or not
            used at all, without a fallback. (BatchNorm in training mode is refused by the
            data loop, :class:`curvops.risk.EmpiricalRisk`, for every operator.)
        NotImplementedError: For a supported layer call in a configuration KFAC cannot
            handle (grouped convolutions, embeddings with ``max_norm``, ...).
    """
    if fallback is None:
        layers = _module_layers(risk)
        if layers is not None:
            for layer in layers:
                check_call(layer.kind, layer.module, f"{layer.type_name} '{layer.name}'")
                check_layer_options(layer, kfac_approx)
            return layers, []
    recorder = probe_uses(risk, what)
    calls = recorder.calls
    names = risk.param_names
    places = _module_places(risk.module)
    as_weight, as_bias = defaultdict(list), defaultdict(list)
    for c, call in enumerate(calls):
        if call.weight is not None:
            as_weight[call.weight].append(c)
        if call.bias is not None:
            as_bias[call.bias].append(c)

    fallback_indices: list[int] = []
    for index in range(len(risk.params)):
        problem = _unsupported(index, recorder.unsupported, as_weight, as_bias)
        if problem is None:
            continue
        if fallback is None:
            raise ValueError(
                f"Parameter '{names[index]}'{_owner(places, index, risk)} {problem}, which "
                f"{what} has no Kronecker factors for (supported: {SUPPORTED_USES}). Pass "
                f"fallback='diagonal' to use the exact diagonal of the curvature for such "
                f"parameters, or remove them from `params`."
            )
        fallback_indices.append(index)
    fallen = set(fallback_indices)

    order = (
        {}
        if risk.module is None
        else {name: i for i, (name, _) in enumerate(risk.module.named_modules())}
    )
    layers: list[tuple[tuple, KFACLayer]] = []
    joined: set[int] = set()
    for w in sorted(i for i in as_weight if i not in fallen):
        uses = as_weight[w]
        biases = {calls[c].bias for c in uses}
        b = next(iter(biases)) if len(biases) == 1 else None
        if b is None or b in fallen or as_bias[b] != uses:
            b = None
        else:
            joined.add(b)
        layers.append(_make_layer(risk, places, order, calls, uses, w, b))
    for b in sorted(i for i in as_bias if i not in fallen and i not in joined):
        layers.append(_make_layer(risk, places, order, calls, as_bias[b], None, b))

    layers.sort(key=lambda item: item[0])
    ordered = []
    taken: set[str] = set()
    for _, layer in layers:
        if layer.name in taken:  # e.g. the bias of a module whose weight is tied elsewhere
            primary = layer.weight_index if layer.weight_index is not None else layer.bias_index
            layer.name = names[primary]
        taken.add(layer.name)
        ordered.append(layer)
    for layer in ordered:
        where = f"{layer.type_name} '{layer.name}'"
        for call in calls:
            if layer.weight_index is not None:
                own = call.weight == layer.weight_index
            else:
                own = call.bias == layer.bias_index
            if own:
                check_call(call.kind, call.options, where)
        check_layer_options(layer, kfac_approx)
    return ordered, fallback_indices


def _module_layers(risk: EmpiricalRisk) -> list[KFACLayer] | None:
    """The layers of a module whose parameters all belong to standard layer modules.

    NOTE [layers of standard modules]: if every parameter is the weight or bias of exactly
    one ``nn.Linear``, ``nn.Conv*d`` or ``nn.Embedding`` (or a subclass keeping its
    ``forward``), each module is one layer, known without a forward pass: such a module
    calls its layer function with its weight and bias (NOTE [weight uses]). A module called
    several times then simply has several calls (NOTE [weight sharing]); any other use of
    its parameters is found by the statistics pass, which raises an error naming it.

    Returns:
        The layers in module order, or ``None`` if a parameter does not fit (then the layers
        are found from a forward pass).
    """
    if risk.module is None:
        return None
    order: dict[str, int] = {}
    places = _module_places(risk.module, order)
    layers: dict[str, KFACLayer] = {}
    for index, p in enumerate(risk.params):
        where = places[id(p)]
        if len(where) != 1:
            return None
        mod_name, module, attr = where[0]
        layer_type = supported_layer_type(module)
        if layer_type is None or attr not in ("weight", "bias"):
            return None
        if layer_type is EmbeddingLayer:
            # NOTE [functional tied head]: a GPT-style model may also call
            # F.linear(h, wte.weight) with an embedding's weight (no nn.Linear module holds
            # it); only the forward pass shows it, so embeddings are found from the calls
            return None
        if mod_name not in layers:
            layers[mod_name] = layer_type(mod_name, module, None, None)
        setattr(layers[mod_name], f"{attr}_index", index)
    return sorted(layers.values(), key=lambda layer: order.get(layer.name, len(order)))


def _unsupported(index: int, unsupported: dict, as_weight: dict, as_bias: dict) -> str | None:
    """Why a parameter has no Kronecker structure (``None`` if it has)."""
    if index in unsupported:
        ops = ", ".join(unsupported[index])
        return f"is used by {ops}"
    if index in as_weight and index in as_bias:
        return "is used both as a weight and as a bias of layer calls"
    if index not in as_weight and index not in as_bias:
        return "is not used by the forward pass (of the first batch)"
    return None


def _module_places(
    model: nn.Module | None, order: dict[str, int] | None = None
) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Where each parameter sits in the model: ``(module name, module, attribute)``.

    If ``order`` is given, it receives each module name's position in the walk.
    """
    places: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    if model is not None:
        for mod_name, module in model.named_modules(remove_duplicate=False):
            if order is not None:
                order.setdefault(mod_name, len(order))
            for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
                places[id(p)].append((mod_name, module, attr))
    return places


def _owner(places: dict, index: int, risk: EmpiricalRisk) -> str:
    """`` belongs to Module 'name' and`` for a module's parameter (for messages)."""
    where = places.get(id(risk.params[index]))
    if not where:
        return ""
    mod_name, module, _ = where[0]
    return f" belongs to {type(module).__name__} '{mod_name or '<root>'}' and"


def _make_layer(
    risk: EmpiricalRisk,
    places: dict,
    order: dict[str, int],
    calls: list[Call],
    uses: list[int],
    w: int | None,
    b: int | None,
) -> tuple[tuple, KFACLayer]:
    """Build the layer of a weight ``w`` (and bias ``b``) or of a bias alone, with a sort key."""
    primary = w if w is not None else b
    kinds = list(dict.fromkeys(calls[c].kind for c in uses))  # in call order
    where = places.get(id(risk.params[primary]), [])
    name = _layer_name(risk.param_names[primary], where, w is None)
    module = where[0][1] if where else None
    type_name = "+".join(_kind_name(kind, where, calls, uses) for kind in kinds)
    weight_shape = calls[uses[0]].weight_shape
    options = {
        "weight_shape": weight_shape,
        "dtype": risk.dtype,
        "device": risk.device,
        "type_name": type_name,
    }
    if set(kinds) == {EMBEDDING, LINEAR} and b is None:
        layer = TiedEmbeddingLinearLayer(
            name, module, w, None, padding_idx=_padding_idx(calls, uses, type_name, name), **options
        )
    elif len(kinds) == 1:
        if kinds[0] == EMBEDDING:
            options["padding_idx"] = _padding_idx(calls, uses, type_name, name)
        layer = LAYER_TYPES[kinds[0]](name, module, w, b, **options)
    else:
        raise NotImplementedError(
            f"Parameter '{risk.param_names[primary]}' is used by layer calls of the kinds "
            f"{kinds}; KFAC combines the calls of one parameter only if they are of one kind, "
            f"or an embedding and a linear layer sharing a weight. Remove it from `params`."
        )
    layer.kinds = tuple(kinds)  # in call order
    if where:
        key = (order.get(where[0][0], len(order)), primary)
    else:
        key = (uses[0], primary)
    return key, layer


def _layer_name(param_name: str, where: list, bias_only: bool) -> str:
    if where:
        return where[0][0]
    suffix = ".bias" if bias_only else ".weight"
    return param_name[: -len(suffix)] if param_name.endswith(suffix) else param_name


def _kind_name(kind: str, where: list, calls: list[Call], uses: list[int]) -> str:
    """The class name of a standard module of that kind owning the parameter, or the kind's."""
    for _, module, _ in where:
        if isinstance(module, _STANDARD_MODULES[kind]):
            return type(module).__name__
    if kind == CONV:
        dims = len(next(calls[c] for c in uses if calls[c].kind == CONV).weight_shape) - 2
        return f"Conv{dims}d"
    return {LINEAR: "Linear", EMBEDDING: "Embedding"}[kind]


def _padding_idx(calls: list[Call], uses: list[int], type_name: str, name: str) -> int | None:
    values = {calls[c].options.padding_idx for c in uses if calls[c].kind == EMBEDDING}
    if len(values) > 1:
        raise NotImplementedError(
            f"{type_name} '{name}': the embedding calls of its weight use different "
            f"padding_idx {sorted(values, key=str)}; KFAC needs one padding_idx per weight."
        )
    return next(iter(values))
