"""Which parameters get Kronecker blocks, which fall back, and which configurations are refused.

Each parameter of the operator is located in the model by identity. A weight or bias of a
supported layer (:func:`curvops.kronecker.layers.supported_layer_type`) joins that layer's
Kronecker block(s); any other parameter (normalisation layers, raw ``nn.Parameter`` s used in a
``forward``, unsupported layers) uses the fallback the user chose, or raises an error naming
the parameter, its module and the option. Parameters shared by several modules (tied weights)
are refused: their curvature couples the places they are used in.
"""

from __future__ import annotations

from collections import defaultdict

from curvops.kronecker.layers import KFACLayer, check_layer_options, supported_layer_type
from curvops.kronecker.options import FallbackType
from curvops.risk import EmpiricalRisk


def discover_layers(
    risk: EmpiricalRisk, *, kfac_approx: str, fallback: FallbackType | None, what: str
) -> tuple[list[KFACLayer], list[int]]:
    """Assign every parameter to a supported layer or to the fallback.

    Args:
        risk: The data loop holding the model and the parameters.
        kfac_approx: ``"expand"`` or ``"reduce"`` (some layers refuse ``"reduce"``).
        fallback: The fallback for parameters of unsupported layers, or ``None``.
        what: Name of the operator, for error messages.

    Returns:
        The supported layers (in the model's module order) and the positions of the
        parameters using the fallback.

    Raises:
        TypeError: If the model is not an ``nn.Module``.
        ValueError: For tied parameters, or parameters of unsupported layers without a
            fallback. (BatchNorm in training mode is refused by the data loop,
            :class:`curvops.risk.EmpiricalRisk`, for every operator.)
    """
    model = risk.module
    if model is None:
        raise TypeError(
            f"{what} needs model_func to be an nn.Module: it reads layer inputs with forward "
            f"hooks. Wrap your function in an nn.Module whose submodules are the layers."
        )
    places = defaultdict(list)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            places[id(p)].append((mod_name, module, attr))

    layers: dict[str, KFACLayer] = {}
    fallback_indices: list[int] = []
    for index, (p, pname) in enumerate(zip(risk.params, risk.param_names)):
        where = places[id(p)]
        if len(where) > 1:
            used = ", ".join(f"'{m or '<root>'}.{a}'" for m, _, a in where)
            raise ValueError(
                f"Parameter '{pname}' is shared by several places in the model ({used}), e.g. "
                f"tied weights. {what} does not support tied parameters: their curvature "
                f"couples the places they are used in. Remove it from `params`."
            )
        mod_name, module, attr = where[0]
        layer_type = supported_layer_type(module)
        if layer_type is not None and attr in ("weight", "bias"):
            if mod_name not in layers:
                layers[mod_name] = layer_type(mod_name, module, None, None)
            setattr(layers[mod_name], f"{attr}_index", index)
            continue
        if fallback is None:
            owner = f"{type(module).__name__} '{mod_name or '<root>'}'"
            raise ValueError(
                f"Parameter '{pname}' belongs to {owner}, which {what} has no Kronecker "
                f"factors for (supported: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding). Pass "
                f"fallback='diagonal' to use the exact diagonal of the curvature for such "
                f"parameters, or remove them from `params`."
            )
        fallback_indices.append(index)

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    ordered = sorted(layers.values(), key=lambda layer: order.get(layer.name, len(order)))
    for layer in ordered:
        check_layer_options(layer, kfac_approx)
    return ordered, fallback_indices
