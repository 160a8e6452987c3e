r"""Every use of a tracked weight in a forward pass, found by intercepting functional calls.

NOTE [weight uses]: KFAC needs, for every weight it factors, the inputs and the output
gradients of *each* place the weight acts on data. Rather than hooking modules (which sees a
module's calls, not its weight's uses, and needs an ``nn.Module``), the forward pass runs
under a :class:`torch.overrides.TorchFunctionMode` that sees every torch function call and
recognises the layer calls

* ``F.linear(x, W, b)`` (``nn.Linear`` and any module or function calling it),
* ``F.conv1d/2d/3d(x, W, b, stride, padding, dilation, groups)`` (``nn.Conv*d``; a
  ``padding_mode`` other than ``"zeros"`` pads ``x`` before the call),
* ``F.embedding(ids, W, padding_idx, max_norm, ...)`` (``nn.Embedding``),

whose weight (or bias) argument *is* one of the tracked parameters (an identity check on the
tensor passed in). This works for modules and for callables ``(params, X) -> output`` alike,
and finds a weight used several times (a layer applied twice, an embedding tied to the output
layer). A call records its input (detached) and the *gradient edge* of its output
(:func:`torch.autograd.graph.get_gradient_edge`), so the output gradients are those of the
call even if a later operation changes the output in place (``ReLU(inplace=True)``).

Any other function that receives a tracked parameter and returns a tensor requiring gradients
(``W.T``, ``x @ W``, ``F.layer_norm(x, shape, W)``, ``torch.addmm(b, x, W)``, a
parametrisation) is an *unsupported use*: the parameter has no Kronecker structure there, and
the operators use the fallback for it or raise an error naming the parameter and the
function. Calls that only read metadata (``W.shape``, ``W.dtype``) or return the parameter
itself (``W.to(W.dtype)``) are not uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode, resolve_name

LINEAR, CONV, EMBEDDING = "linear", "conv", "embedding"


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of one convolution call (the attributes :mod:`curvops.kronecker.unfold` reads).

    Attributes:
        kernel_size: Kernel size per spatial axis.
        stride: Stride per spatial axis.
        padding: Zero padding per spatial axis, or ``"same"`` / ``"valid"``.
        dilation: Dilation per spatial axis.
        groups: Number of groups.
        in_channels: Number of input channels.
        padding_mode: Always ``"zeros"`` (a module with another mode pads before the call).
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    in_channels: int
    padding_mode: str = "zeros"


@dataclass(frozen=True)
class EmbeddingOptions:
    """Options of one embedding call.

    Attributes:
        num_embeddings: Number of rows of the weight.
        padding_idx: Index whose rows get no gradient (non-negative), or ``None``.
        max_norm: ``max_norm`` of the call.
        scale_grad_by_freq: ``scale_grad_by_freq`` of the call.
    """

    num_embeddings: int
    padding_idx: int | None
    max_norm: float | None
    scale_grad_by_freq: bool


@dataclass
class Call:
    """One recognised layer call whose weight or bias is tracked.

    Attributes:
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        op: Name of the function called.
        x: The call's input (detached).
        weight: Position of the weight in the tracked parameters, or ``None`` if untracked.
        bias: Position of the bias in the tracked parameters, or ``None``.
        weight_shape: Shape of the weight passed in.
        options: :class:`ConvGeometry`, :class:`EmbeddingOptions`, or ``None`` (linear).
        out_shape: Shape of the call's output.
        out_dtype: Data type of the call's output.
        edge: Gradient edge of the output (``None`` if it does not require gradients).
        version: Version counter of the input at the call (to detect later in-place changes).
    """

    kind: str
    op: str
    x: Tensor
    weight: int | None
    bias: int | None
    weight_shape: tuple[int, ...]
    options: ConvGeometry | EmbeddingOptions | None
    out_shape: torch.Size
    out_dtype: torch.dtype
    edge: GradientEdge | None
    version: int

    @property
    def out_numel(self) -> int:
        """Number of entries of the output."""
        return prod(self.out_shape)


class LayerInputs(tuple):
    """The inputs of a layer's calls in one batch: a tuple of tensors, one per call.

    A layer called once gets ``(x,)``, as the positional inputs of a module. The attribute
    :attr:`calls` holds the :class:`Call` records (geometry, options) in the same order.
    """

    calls: tuple[Call, ...]

    def __new__(cls, calls: Iterable[Call]):
        """A tuple of the calls' inputs, remembering the calls."""
        calls = tuple(calls)
        obj = super().__new__(cls, (c.x for c in calls))
        obj.calls = calls
        return obj


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _conv_geometry(bound: dict[str, Any], weight: Tensor) -> ConvGeometry:
    dims = weight.ndim - 2
    padding = bound["padding"]
    groups = int(bound["groups"])
    return ConvGeometry(
        kernel_size=tuple(weight.shape[2:]),
        stride=_ntuple(bound["stride"], dims),
        padding=padding if isinstance(padding, str) else _ntuple(padding, dims),
        dilation=_ntuple(bound["dilation"], dims),
        groups=groups,
        in_channels=weight.shape[1] * groups,
    )


def _embedding_options(bound: dict[str, Any], weight: Tensor) -> EmbeddingOptions:
    num = weight.shape[0]
    padding_idx = bound["padding_idx"]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num  # as F.embedding does
    return EmbeddingOptions(num, padding_idx, bound["max_norm"], bool(bound["scale_grad_by_freq"]))


@dataclass(frozen=True)
class _LayerCallSpec:
    kind: str
    names: tuple[str, ...]
    defaults: dict[str, Any]

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = dict(self.defaults)
        bound.update(zip(self.names, args))
        bound.update(kwargs)
        return bound


_CONV_SPEC = _LayerCallSpec(
    CONV,
    ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
)
_SPECS: dict[Any, _LayerCallSpec] = {
    F.linear: _LayerCallSpec(LINEAR, ("input", "weight", "bias"), {"bias": None}),
    F.conv1d: _CONV_SPEC,
    F.conv2d: _CONV_SPEC,
    F.conv3d: _CONV_SPEC,
    F.embedding: _LayerCallSpec(
        EMBEDDING,
        (
            "input",
            "weight",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
        ),
        {
            "padding_idx": None,
            "max_norm": None,
            "norm_type": 2.0,
            "scale_grad_by_freq": False,
            "sparse": False,
        },
    ),
}

SUPPORTED_USES = (
    "the weight (and bias) argument of F.linear, F.conv1d/2d/3d (groups=1) or F.embedding, "
    "as in nn.Linear, nn.Conv1d/2d/3d and nn.Embedding"
)
"""What counts as a supported use of a parameter (for error messages)."""


_OP_NAMES: dict[Any, str] = {}


def op_name(func: Any) -> str:
    """A readable name of a torch function (e.g. ``torch.nn.functional.linear``).

    Cached per function: every recorded layer call names its function, and resolving a name
    costs more than the rest of the record.
    """
    try:
        return _OP_NAMES[func]
    except (KeyError, TypeError):  # TypeError: an unhashable callable
        pass
    try:
        name = resolve_name(func)
    except Exception:  # pragma: no cover - resolve_name is best effort
        name = None
    name = name or getattr(func, "__qualname__", None) or repr(func)
    try:
        _OP_NAMES[func] = name
    except TypeError:  # pragma: no cover - unhashable
        pass
    return name


def _tensors_in(values: Iterable[Any]) -> Iterable[Tensor]:
    """Tensors among ``values`` and inside lists/tuples among them (one level)."""
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, Tensor):
                    yield w


class UseRecorder(TorchFunctionMode):
    """Records the uses of tracked parameters during a forward pass (NOTE [weight uses]).

    Enter it (``with recorder.recording(): model(X)``) around the forward pass.

    Args:
        params: All parameters of the operator.
        tracked: Positions of the parameters whose uses are recorded.

    Attributes:
        calls: The recognised layer calls with a tracked weight or bias, in call order.
        unsupported: Per tracked position, the names of the functions that used it in another
            way (see NOTE [weight uses]).
    """

    def __init__(self, params: list[Tensor], tracked: Iterable[int]):
        super().__init__()
        self._params = params  # holds the tensors alive, so their ids stay theirs
        self._index = {id(params[i]): i for i in tracked}
        self.calls: list[Call] = []
        self.unsupported: dict[int, list[str]] = {}

    def recording(self) -> UseRecorder:
        """Reset the records and return the mode, to be entered with ``with``."""
        self.calls, self.unsupported = [], {}
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = _SPECS.get(func)
        if spec is not None:
            return self._layer_call(spec, func, args, kwargs)
        index = self._index
        hits = [index[id(t)] for t in _tensors_in((*args, *kwargs.values())) if id(t) in index]
        out = func(*args, **kwargs)
        if hits and self._carries_gradient(out):
            for i in hits:
                self._add_unsupported(i, op_name(func))
        return out

    def _carries_gradient(self, out: Any) -> bool:
        """Whether an output is a new tensor requiring gradients (not a tracked parameter)."""
        outs = [out] if isinstance(out, Tensor) else list(_tensors_in([out]))
        return any(t.requires_grad and id(t) not in self._index for t in outs)

    def _add_unsupported(self, index: int, name: str) -> None:
        names = self.unsupported.setdefault(index, [])
        if name not in names:
            names.append(name)

    def _layer_call(self, spec: _LayerCallSpec, func, args: tuple, kwargs: dict) -> Any:
        index = self._index
        bound = spec.bind(args, kwargs)
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        w = index.get(id(weight))
        b = None if bias is None else index.get(id(bias))
        others = [
            index[id(t)]
            for key, value in bound.items()
            if key not in ("weight", "bias")
            for t in _tensors_in([value])
            if id(t) in index
        ]
        out = func(*args, **kwargs)
        if others:
            for i in others:
                self._add_unsupported(i, f"{op_name(func)} (not as its weight or bias)")
        if w is None and b is None:
            return out
        if spec.kind == CONV:
            options = _conv_geometry(bound, weight)
        elif spec.kind == EMBEDDING:
            options = _embedding_options(bound, weight)
        else:
            options = None
        edge = get_gradient_edge(out) if out.requires_grad else None
        self.calls.append(
            Call(
                kind=spec.kind,
                op=op_name(func),
                x=x.detach(),
                weight=w,
                bias=b,
                weight_shape=tuple(weight.shape),
                options=options,
                out_shape=out.shape,
                out_dtype=out.dtype,
                edge=edge,
                version=x._version,
            )
        )
        return out

    def modified_inputs(self) -> list[Call]:
        """The calls whose input was changed in place after the call (read wrong values)."""
        return [c for c in self.calls if c.x._version != c.version]
