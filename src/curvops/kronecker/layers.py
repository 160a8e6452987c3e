r"""Per-layer-type math of the Kronecker factors: layers as matrix products on *rows*.

Every supported layer computes, for each datum :math:`n` and each *shared position*
:math:`t` (a sequence position, a convolution's output location; a single one for a plain
``nn.Linear`` on ``[N, d_in]``),

.. math::
    z_{n,t} = W_\text{mat} x_{n,t} \;(+\, b),

with a weight matrix :math:`W_\text{mat} \in \mathbb{R}^{d_\text{out} \times d_\text{in}}`
that is a row-major reshape (``nn.Linear``, ``nn.Conv*d``) or the transpose (``nn.Embedding``,
where :math:`x_{n,t}` is a one-hot token) of the weight tensor. A layer type only needs to
turn its input into *input rows* ``[N, T, d_in]`` and the backpropagated output gradients
into *gradient rows* ``[K, N, T, d_out]``; the factor math in
:mod:`curvops.kronecker.factors` is shared by all layer types.
"""

from __future__ import annotations

from math import prod

from torch import Tensor, nn

from curvops.kronecker.unfold import (
    kernel_major_order,
    unfold_conv_input,
    unfold_conv_input_kernel_major,
)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class KFACLayer:
    """A supported layer whose weight (and bias) get Kronecker-factored blocks.

    Attributes:
        name: The module's name in the model.
        module: The module.
        weight_index: Position of the weight in the operator's parameter list (or ``None``).
        bias_index: Position of the bias in the operator's parameter list (or ``None``).
        diagonal_input: Whether the input factor is diagonal (one-hot inputs); then
            :meth:`input_rows` returns integer token ids ``[N, T]`` instead of rows.
    """

    diagonal_input = False

    def __init__(
        self, name: str, module: nn.Module, weight_index: int | None, bias_index: int | None
    ):
        """Bind the module and the positions of its parameters.

        Args:
            name: The module's name in the model.
            module: The module.
            weight_index: Position of the weight in the parameter list, or ``None``.
            bias_index: Position of the bias in the parameter list, or ``None``.
        """
        self.name = name
        self.module = module
        self.weight_index = weight_index
        self.bias_index = bias_index

    @property
    def type_name(self) -> str:
        """Class name of the module (for messages)."""
        return type(self.module).__name__

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:
        """Shape ``(d_out, d_in)`` of the weight matrix :math:`W_\\text{mat}`."""
        w = self.module.weight
        return (w.shape[0], prod(w.shape[1:]))

    def input_rows(self, inputs: tuple) -> Tensor:
        """Turn the layer's positional inputs into input rows ``[N, T, d_in]``."""
        raise NotImplementedError

    def grad_rows(self, grad_output: Tensor) -> Tensor:
        """Turn output gradients ``[K, *output.shape]`` into gradient rows ``[K, N, T, d_out]``."""
        raise NotImplementedError

    def factor_input_rows(self, inputs: tuple) -> tuple[Tensor, Tensor | None]:
        """Input rows for the input factor's sums, in the layout cheapest to sum.

        Returns:
            Rows ``[N, T, d_in]`` whose features may be permuted, and the permutation
            ``order`` (feature ``j`` is feature ``order[j]`` of :meth:`input_rows`), or
            ``None`` if they are in the order of :meth:`input_rows`.
        """
        return self.input_rows(inputs), None

    def _batched(self, t: Tensor, min_ndim: int, what: str) -> Tensor:
        if t.ndim < min_ndim:
            raise ValueError(
                f"{self.type_name} '{self.name}' received an {what} of shape {tuple(t.shape)} "
                f"without a batch axis. KFAC needs the leading axis of every layer input to "
                f"index data."
            )
        return t


class LinearLayer(KFACLayer):
    """``nn.Linear`` on inputs ``[N, *, d_in]``; the axes ``*`` are shared positions."""

    def input_rows(self, inputs: tuple) -> Tensor:  # noqa: D102
        x = self._batched(inputs[0], 2, "input")
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def grad_rows(self, grad_output: Tensor) -> Tensor:  # noqa: D102
        return grad_output.reshape(
            grad_output.shape[0], grad_output.shape[1], -1, grad_output.shape[-1]
        )


class ConvLayer(KFACLayer):
    """``nn.Conv1d/2d/3d`` (``groups=1``); output locations are shared positions.

    The input rows are the unfolded patches (Grosse & Martens (2016), see
    :mod:`curvops.kronecker.unfold`).
    """

    def input_rows(self, inputs: tuple) -> Tensor:  # noqa: D102
        x = self._batched(inputs[0], len(self.module.kernel_size) + 2, "input")
        return unfold_conv_input(self.module, x)

    def grad_rows(self, grad_output: Tensor) -> Tensor:  # noqa: D102
        return grad_output.flatten(start_dim=3).transpose(2, 3)

    def factor_input_rows(self, inputs: tuple) -> tuple[Tensor, Tensor | None]:
        """Kernel-major patches (cheaper to copy and sum) and their feature order."""
        x = self._batched(inputs[0], len(self.module.kernel_size) + 2, "input")
        rows = unfold_conv_input_kernel_major(self.module, x)
        return rows, kernel_major_order(self.module)


class EmbeddingLayer(KFACLayer):
    """``nn.Embedding``: a linear layer on one-hot tokens, with a diagonal input factor.

    The weight ``[num_embeddings, dim]`` is the transpose of :math:`W_\\text{mat}`, so its
    Kronecker block is :math:`A \\otimes B` (input factor first) on the weight's row-major
    layout. Entries equal to ``padding_idx`` get no gradient and count as zero inputs.
    """

    diagonal_input = True

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:  # noqa: D102
        num, dim = self.module.weight.shape
        return (dim, num)

    def input_rows(self, inputs: tuple) -> Tensor:  # noqa: D102
        ids = self._batched(inputs[0], 1, "input")
        return ids.reshape(ids.shape[0], -1)

    def grad_rows(self, grad_output: Tensor) -> Tensor:  # noqa: D102
        return grad_output.reshape(
            grad_output.shape[0], grad_output.shape[1], -1, grad_output.shape[-1]
        )


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def supported_layer_type(module: nn.Module) -> type[KFACLayer] | None:
    """Return the layer class handling ``module``, or ``None`` if it is not supported.

    Subclasses of supported layers count as supported only if they keep the original
    ``forward`` (a subclass that changes the computation would make the factors wrong).

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


def check_layer_options(layer: KFACLayer, kfac_approx: str) -> None:
    """Raise a clear error for a supported layer type in a configuration KFAC cannot handle.

    Args:
        layer: The layer.
        kfac_approx: ``"expand"`` or ``"reduce"``.

    Raises:
        NotImplementedError: For grouped convolutions, embeddings with ``max_norm`` or
            ``scale_grad_by_freq``, and embeddings with ``kfac_approx="reduce"``.
    """
    m, where = layer.module, f"{layer.type_name} '{layer.name}'"
    if isinstance(layer, ConvLayer) and m.groups != 1:
        raise NotImplementedError(
            f"{where} has groups={m.groups}; KFAC supports convolutions with groups=1 only. "
            f"Exclude its parameters from `params`, or replace the layer."
        )
    if isinstance(layer, EmbeddingLayer):
        if m.max_norm is not None or m.scale_grad_by_freq:
            raise NotImplementedError(
                f"{where} uses max_norm or scale_grad_by_freq, which change the layer's "
                f"gradient; KFAC does not support them. Exclude its parameters from `params`."
            )
        if kfac_approx == "reduce":
            raise NotImplementedError(
                f"{where}: kfac_approx='reduce' would make the embedding's input factor a "
                f"dense num_embeddings x num_embeddings matrix; use kfac_approx='expand'."
            )
