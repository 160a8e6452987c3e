r"""Per-layer-type math of the Kronecker factors: layers as matrix products on *rows*.

Every supported layer computes, for each datum :math:`n` and each *shared position*
:math:`t` (a sequence position, a convolution's output location; a single one for a plain
``nn.Linear`` on ``[N, d_in]``),

.. math::
    z_{n,t} = W_\text{mat} x_{n,t} \;(+\, b),

with a weight matrix :math:`W_\text{mat} \in \mathbb{R}^{d_\text{out} \times d_\text{in}}`
that is a row-major reshape (``F.linear``, ``F.conv*d``) or the transpose (``F.embedding``,
where :math:`x_{n,t}` is a one-hot token) of the weight tensor. A layer type only needs to
turn its input into *input rows* ``[N, T, d_in]`` and the backpropagated output gradients
into *gradient rows* ``[K, N, T, d_out]``; the factor math in
:mod:`curvops.kronecker.factors` is shared by all layer types.

A layer is a weight (with its bias, if the two are always used together) and the calls that
use it (NOTE [weight uses] of :mod:`curvops.kronecker.uses`). NOTE [weight sharing]: a weight
used by several calls of the same kind in one forward pass (a layer applied twice, a
convolution kernel shared by two branches) acts on more shared positions: the rows of all
calls are concatenated along the positions, ``[N, T_1 + T_2 + ..., d]``, so that the
per-datum gradient :math:`G_{k,n} = \sum_{\text{calls}} \sum_t g_{k,n,t} x_{n,t}^\top` is the
exact gradient of the shared weight and ``expand``/``reduce`` treat the calls as positions
(Eschenhagen, R., Immer, A., Turner, R. E., Schneider, F., Hennig, P. (2023).
Kronecker-factored approximate curvature for modern neural network architectures). The
calls must share the data axis (the same :math:`N`). An embedding tied to a linear output
layer is handled by :mod:`curvops.kronecker.tied`.
"""

from __future__ import annotations

import copy
from math import prod

import torch
from torch import Tensor, nn

from curvops.kronecker.unfold import (
    conv_output_size,
    kernel_major_order,
    unfold_conv_input,
    unfold_conv_input_kernel_major,
)
from curvops.kronecker.uses import CONV, EMBEDDING, LINEAR, Call, ConvGeometry

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class KFACLayer:
    """A weight (and bias) with Kronecker-factored blocks, and the calls that use it.

    Attributes:
        name: The layer's name: the name of the module owning the weight (or bias), or for
            a callable model the weight's (bias') parameter name without ``.weight``
            (``.bias``).
        module: The module owning the weight (or bias), or ``None`` for a callable model.
        weight_index: Position of the weight in the operator's parameter list (or ``None``).
        bias_index: Position of the bias in the operator's parameter list (or ``None``).
        weight_shape: Shape of the weight tensor the calls use.
        dtype: Data type of the parameters.
        device: Device of the parameters.
        kind: The kind of calls whose rows the class forms (``"linear"``, ``"conv"``,
            ``"embedding"``).
        kinds: The kinds of calls the layer has (checked in every pass).
        diagonal_input: Whether the input factor is diagonal (one-hot inputs); then
            :meth:`input_rows` returns integer token ids ``[N, T]`` instead of rows.
    """

    kind = ""
    diagonal_input = False

    def __init__(
        self,
        name: str,
        module: nn.Module | None,
        weight_index: int | None,
        bias_index: int | None,
        *,
        weight_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        type_name: str | None = None,
    ):
        """Bind the layer's name, module and parameter positions.

        Args:
            name: The layer's name.
            module: The module owning the weight, or ``None``.
            weight_index: Position of the weight in the parameter list, or ``None``.
            bias_index: Position of the bias in the parameter list, or ``None``.
            weight_shape: Shape of the weight (default: ``module.weight``'s).
            dtype: Data type of the factors (default: ``module.weight``'s).
            device: Device of the factors (default: ``module.weight``'s).
            type_name: Name of the layer type for messages (default: the module's class
                name).

        Raises:
            ValueError: If shape, dtype or device are missing and ``module`` has no weight.
        """
        self.name = name
        self.module = module
        self.weight_index = weight_index
        self.bias_index = bias_index
        if weight_shape is None or dtype is None or device is None:
            w = getattr(module, "weight", None)
            if not isinstance(w, Tensor):
                raise ValueError(
                    f"Layer '{name}' needs weight_shape, dtype and device: its module "
                    f"{type(module).__name__} has no weight tensor to read them from."
                )
            weight_shape = tuple(w.shape) if weight_shape is None else weight_shape
            dtype = w.dtype if dtype is None else dtype
            device = w.device if device is None else device
        self.weight_shape = tuple(weight_shape)
        self.dtype = dtype
        self.device = device
        self._type_name = type_name
        self.kinds: tuple[str, ...] = (self.kind,)

    def block(self, name: str, weight_index: int | None, bias_index: int | None) -> KFACLayer:
        """A copy of the layer with another name and parameter positions (e.g. a bias block).

        Unlike ``type(layer)(name, layer.module, ...)``, this keeps the weight's shape, dtype
        and device also without a module (a callable model) and the layer's calls' kinds.
        """
        out = copy.copy(self)
        out.name, out.weight_index, out.bias_index = name, weight_index, bias_index
        return out

    @property
    def type_name(self) -> str:
        """The layer type (the module's class name) for messages and :class:`LayerFactors`."""
        if self._type_name is not None:
            return self._type_name
        return type(self.module).__name__

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:
        """Shape ``(d_out, d_in)`` of the weight matrix :math:`W_\\text{mat}`."""
        return (self.weight_shape[0], prod(self.weight_shape[1:]))

    # ------------------------------------------------------------ rows of all calls
    def input_rows(self, inputs: tuple) -> Tensor:
        """Input rows ``[N, T, d_in]`` of all calls (NOTE [weight sharing]).

        Args:
            inputs: The layer's inputs of one batch (:class:`~curvops.kronecker.uses.
                LayerInputs`, or a module's positional inputs ``(x,)`` for one call with the
                module's geometry).
        """
        return self._cat([self._call_input_rows(x, call) for x, call in _calls(inputs)], 1)

    def grad_rows(self, grad_output: Tensor | tuple[Tensor, ...]) -> Tensor:
        """Gradient rows ``[K, N, T, d_out]`` from the output gradients ``[K, *output.shape]``.

        Args:
            grad_output: The output gradients of the layer's call, or a tuple with those of
                each call (in the order of the inputs).
        """
        grads = grad_output if isinstance(grad_output, tuple) else (grad_output,)
        return self._cat([self._call_grad_rows(g) for g in grads], 2)

    def factor_input_rows(self, inputs: tuple) -> tuple[Tensor, Tensor | None]:
        """Input rows for the input factor's sums, in the layout cheapest to sum.

        Returns:
            Rows ``[N, T, d_in]`` whose features may be permuted, and the permutation
            ``order`` (feature ``j`` is feature ``order[j]`` of :meth:`input_rows`), or
            ``None`` if they are in the order of :meth:`input_rows`.
        """
        return self.input_rows(inputs), None

    def positions_per_call(self, inputs: tuple) -> list[int]:
        """Number of rows :math:`T` of each call, in the order of :meth:`input_rows`."""
        return [self._call_positions(x, call) for x, call in _calls(inputs)]

    # ------------------------------------------------------------ one call
    def _call_input_rows(self, x: Tensor, call: Call | None) -> Tensor:
        raise NotImplementedError

    def _call_grad_rows(self, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])

    def _call_positions(self, x: Tensor, call: Call | None) -> int:
        return x.shape[1:-1].numel()

    def _cat(self, rows: list[Tensor], dim: int) -> Tensor:
        if len(rows) == 1:
            return rows[0]
        sizes = {r.shape[dim - 1] for r in rows}
        if len(sizes) > 1:
            raise ValueError(
                f"{self.type_name} '{self.name}': its weight is used by several calls whose "
                f"inputs have different leading (data) axes {sorted(sizes)}. KFAC treats "
                "the calls of a shared weight as positions of the same data (NOTE [weight "
                "sharing]); give every call an input whose leading axis indexes the data."
            )
        return torch.cat(rows, dim=dim)

    def _batched(self, t: Tensor, min_ndim: int, what: str) -> Tensor:
        if t.ndim < min_ndim:
            raise ValueError(
                f"{self.type_name} '{self.name}' received an {what} of shape {tuple(t.shape)} "
                f"without a batch axis. KFAC needs the leading axis of every layer input to "
                f"index data."
            )
        return t


def _calls(inputs: tuple) -> list[tuple[Tensor, Call | None]]:
    """The (input, call) pairs of a layer's inputs; ``(x,)`` without calls is one call."""
    calls = getattr(inputs, "calls", None)
    if calls is None:
        return [(inputs[0], None)]
    return list(zip(inputs, calls))


class LinearLayer(KFACLayer):
    """``F.linear`` on inputs ``[N, *, d_in]``; the axes ``*`` are shared positions."""

    kind = LINEAR

    def _call_input_rows(self, x: Tensor, call: Call | None) -> Tensor:
        x = self._batched(x, 2, "input")
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ConvLayer(KFACLayer):
    """``F.conv1d/2d/3d`` (``groups=1``); output locations are shared positions.

    The input rows are the unfolded patches (Grosse & Martens (2016), see
    :mod:`curvops.kronecker.unfold`).
    """

    kind = CONV

    def _geometry(self, call: Call | None) -> ConvGeometry | nn.Module:
        return self.module if call is None else call.options

    def _call_input_rows(self, x: Tensor, call: Call | None) -> Tensor:
        geometry = self._geometry(call)
        x = self._batched(x, len(geometry.kernel_size) + 2, "input")
        return unfold_conv_input(geometry, x)

    def _call_grad_rows(self, g: Tensor) -> Tensor:
        return g.flatten(start_dim=3).transpose(2, 3)

    def _call_positions(self, x: Tensor, call: Call | None) -> int:
        return prod(conv_output_size(self._geometry(call), x))

    def factor_input_rows(self, inputs: tuple) -> tuple[Tensor, Tensor | None]:
        """Kernel-major patches (cheaper to copy and sum) and their feature order."""
        rows = []
        for x, call in _calls(inputs):
            geometry = self._geometry(call)
            x = self._batched(x, len(geometry.kernel_size) + 2, "input")
            rows.append(unfold_conv_input_kernel_major(geometry, x))
        C, kernel = self.weight_shape[1], self.weight_shape[2:]
        return self._cat(rows, 1), kernel_major_order(C, kernel, device=self.device)


class EmbeddingLayer(KFACLayer):
    """``F.embedding``: a linear layer on one-hot tokens, with a diagonal input factor.

    The weight ``[num_embeddings, dim]`` is the transpose of :math:`W_\\text{mat}`, so its
    Kronecker block is :math:`A \\otimes B` (input factor first) on the weight's row-major
    layout. Entries equal to :attr:`padding_idx` get no gradient and count as zero inputs.

    Attributes:
        padding_idx: The calls' ``padding_idx`` (non-negative), or ``None``.
    """

    kind = EMBEDDING
    diagonal_input = True

    def __init__(self, *args, padding_idx: int | None = None, **kwargs):  # noqa: D107
        super().__init__(*args, **kwargs)
        if padding_idx is None and isinstance(self.module, nn.Embedding):
            padding_idx = self.module.padding_idx
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        """Number of rows of the weight."""
        return self.weight_shape[0]

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:  # noqa: D102
        num, dim = self.weight_shape
        return (dim, num)

    def _call_input_rows(self, x: Tensor, call: Call | None) -> Tensor:
        ids = self._batched(x, 1, "input")
        return ids.reshape(ids.shape[0], -1)

    def _call_positions(self, x: Tensor, call: Call | None) -> int:
        return x.shape[1:].numel()

    def counted_tokens(self, ids: Tensor) -> Tensor:
        """Mask of the token ids (of :meth:`input_rows`) that are not :attr:`padding_idx`."""
        if self.padding_idx is None:
            return torch.ones_like(ids, dtype=torch.bool)
        return ids != self.padding_idx


LAYER_TYPES: dict[str, type[KFACLayer]] = {
    LINEAR: LinearLayer,
    CONV: ConvLayer,
    EMBEDDING: EmbeddingLayer,
}
"""The layer class handling the calls of each kind."""


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def supported_layer_type(module: nn.Module) -> type[KFACLayer] | None:
    """Return the layer class of a standard module, or ``None`` if it is not one.

    Kept for code written against earlier versions: the operators find layers from the calls
    of the forward pass (NOTE [weight uses] of :mod:`curvops.kronecker.uses`), which also
    covers modules that override ``forward`` and callables. Subclasses of the standard
    modules count here only if they keep the original ``forward``.

    Args:
        module: A module owning parameters.

    Returns:
        :class:`LinearLayer`, :class:`ConvLayer`, :class:`EmbeddingLayer` or ``None``.
    """
    if isinstance(module, nn.Linear) and not _overrides_forward(module, nn.Linear):
        return LinearLayer
    for conv in _CONV_TYPES:
        if isinstance(module, conv) and not _overrides_forward(module, conv):
            return ConvLayer
    if isinstance(module, nn.Embedding) and not _overrides_forward(module, nn.Embedding):
        return EmbeddingLayer
    return None


def check_call(kind: str, options, where: str) -> None:
    """Raise a clear error for a layer call in a configuration KFAC cannot handle.

    Args:
        kind: The kind of call (``"linear"``, ``"conv"``, ``"embedding"``).
        options: The call's :class:`~curvops.kronecker.uses.ConvGeometry` or
            :class:`~curvops.kronecker.uses.EmbeddingOptions`, or the module making it.
        where: The layer, for the message (e.g. ``"Conv2d 'conv'"``).

    Raises:
        NotImplementedError: For grouped convolutions and embeddings with ``max_norm`` or
            ``scale_grad_by_freq``.
    """
    if kind == CONV and options.groups != 1:
        raise NotImplementedError(
            f"{where} has groups={options.groups}; KFAC supports convolutions with "
            f"groups=1 only. Exclude its parameters from `params`, or replace the layer."
        )
    if kind == EMBEDDING and (options.max_norm is not None or options.scale_grad_by_freq):
        raise NotImplementedError(
            f"{where} uses max_norm or scale_grad_by_freq, which change the layer's "
            f"gradient; KFAC does not support them. Exclude its parameters from `params`."
        )


def check_layer_options(layer: KFACLayer, kfac_approx: str) -> None:
    """Raise a clear error for a layer in a configuration KFAC cannot handle.

    Args:
        layer: The layer.
        kfac_approx: ``"expand"`` or ``"reduce"``.

    Raises:
        NotImplementedError: For embeddings (also tied to an output layer) with
            ``kfac_approx="reduce"``.
    """
    if layer.diagonal_input or getattr(layer, "has_embedding_calls", False):
        if kfac_approx == "reduce":
            raise NotImplementedError(
                f"{layer.type_name} '{layer.name}': kfac_approx='reduce' would make the "
                f"embedding's input factor a dense num_embeddings x num_embeddings matrix; "
                f"use kfac_approx='expand'."
            )
