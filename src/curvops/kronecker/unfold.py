r"""Input unfolding of convolutions: a convolution as a matrix product on patches.

A convolution with weight :math:`W \in \mathbb{R}^{C_\text{out} \times C_\text{in} \times
k_1 \times \dots \times k_d}` computes, at every output position :math:`p`,

.. math::
    z_{:, p} = W_\text{mat} \, x_{[p]} + b,

where :math:`W_\text{mat} \in \mathbb{R}^{C_\text{out} \times C_\text{in} k_1 \cdots k_d}` is
the row-major reshape of :math:`W` and :math:`x_{[p]}` the (zero-padded, dilated) input patch
read by position :math:`p`, flattened in the same order (channel major, then kernel offsets).
Grosse, R., Martens, J. (2016). A Kronecker-factored approximate Fisher matrix for
convolution layers. Their input factor is built from these patches.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Geometry = Any
"""A convolution module (``nn.Conv1d/2d/3d``) or any object with its attributes
``kernel_size``, ``stride``, ``padding``, ``dilation`` and ``padding_mode``, e.g. the geometry
of one ``F.conv*d`` call (:class:`curvops.kronecker.uses.ConvGeometry`)."""


def _padded(module: Geometry, x: Tensor) -> Tensor:
    """The input as the convolution reads it: padded (any padding mode)."""
    if module.padding_mode != "zeros":
        # the module pads explicitly in this case and convolves without padding
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    pads = _zero_padding(module)
    return F.pad(x, pads) if any(pads) else x


def conv_output_size(module: Geometry, x: Tensor) -> list[int]:
    """Spatial output size of a convolution on the (unpadded) input ``x``."""
    if module.padding_mode != "zeros":
        pads = list(module._reversed_padding_repeated_twice)
    else:
        pads = _zero_padding(module)
    # F.pad's list starts at the last axis
    widths = [pads[2 * i] + pads[2 * i + 1] for i in reversed(range(len(module.kernel_size)))]
    sizes = [n + w for n, w in zip(x.shape[2:], widths)]
    return [
        (n - d * (k - 1) - 1) // s + 1
        for n, k, d, s in zip(sizes, module.kernel_size, module.dilation, module.stride)
    ]


def _output_size(module: Geometry, padded: Tensor) -> list[int]:
    return [
        (n - d * (k - 1) - 1) // s + 1
        for n, k, d, s in zip(padded.shape[2:], module.kernel_size, module.dilation, module.stride)
    ]


def unfold_conv_input(module: Geometry, x: Tensor) -> Tensor:
    """Extract the input patches a convolution multiplies with its weight.

    The (padded) input is viewed with strides that step over kernel offsets (scaled by the
    dilation) and output positions (scaled by the stride), then copied once into patch rows;
    no convolution or im2col kernel is involved.

    Args:
        module: The convolution (``groups == 1``) or its geometry.
        x: Its input, ``[N, C_in, *spatial]``.

    Returns:
        The patches, ``[N, P, C_in * prod(kernel_size)]`` with ``P`` output positions, such
        that ``patches @ module.weight.reshape(C_out, -1).T + bias`` equals the layer output
        with its spatial axes flattened to ``P`` and moved before the channels. The result
        is a view of a contiguous *feature-major* buffer ``[C_in * prod(kernel_size), N P]``
        (see :mod:`curvops.kronecker.gram`): its Gram matrix is one matrix product of that
        buffer with its transpose, without another copy.
    """
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    x = _padded(module, x)
    N, C = x.shape[0], x.shape[1]
    out = _output_size(module, x)
    step = x.stride()[2:]
    view = x.as_strided(
        (N, C, *kernel, *out),
        (
            x.stride(0),
            x.stride(1),
            *[st * d for st, d in zip(step, dilation)],
            *[st * s for st, s in zip(step, stride)],
        ),
        x.storage_offset(),
    )
    # one copy into the feature-major buffer [C * prod(kernel), N * P]; the returned [N, P, d]
    # is a view of it (consumers contract it without another copy)
    d, P = C * prod(kernel), prod(out)
    ndim = len(kernel)
    order = (1, *range(2, 2 + ndim), 0, *range(2 + ndim, 2 + 2 * ndim))
    buffer = view.permute(order).reshape(d, N * P)
    return buffer.reshape(d, N, P).permute(1, 2, 0)


def unfold_conv_input_kernel_major(module: Geometry, x: Tensor) -> Tensor:
    """The patches of :func:`unfold_conv_input` with features in *kernel-major* order.

    Feature ``k * C_in + c`` is input channel ``c`` at kernel offset ``k`` (offsets
    flattened row-major), instead of ``c * prod(kernel_size) + k``
    (:func:`kernel_major_order` maps between the two). The patches are copied from a
    channels-last copy of the padded input, whose reads are runs of ``C_in * kernel_size[-1]``
    contiguous entries (instead of runs along the output width), into row-major rows: this
    copy and the Gram matrix of the rows (one matrix product with its transposed view) are
    the cheapest way to the input factor of small convolutions.

    Args:
        module: The convolution (``groups == 1``) or its geometry.
        x: Its input, ``[N, C_in, *spatial]``.

    Returns:
        Patches ``[N, P, prod(kernel_size) * C_in]`` with a contiguous last axis (a copy,
        or a view where the reshape needs none, e.g. 1-D kernels without gaps).
    """
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    padded = _padded(module, x)
    N, C = padded.shape[0], padded.shape[1]
    out = _output_size(module, padded)
    x = padded.movedim(1, -1).contiguous()  # [N, *spatial, C]
    step = x.stride()[1:-1]
    view = x.as_strided(
        (N, *out, *kernel, C),
        (
            x.stride(0),
            *[st * s for st, s in zip(step, stride)],
            *[st * d for st, d in zip(step, dilation)],
            1,
        ),
        x.storage_offset(),
    )
    return view.reshape(N, prod(out), prod(kernel) * C)


def kernel_major_order(
    module: nn.Conv1d | nn.Conv2d | nn.Conv3d | int,
    kernel_size: tuple[int, ...] | None = None,
    *,
    device: torch.device | None = None,
) -> Tensor:
    """Channel-major feature index of every kernel-major feature.

    Args:
        module: The convolution, or its number of input channels.
        kernel_size: The kernel size (only with a number of channels).
        device: Device of the result (default: the convolution's).

    Returns:
        ``order`` with ``kernel_major[..., j] == channel_major[..., order[j]]`` for the rows
        of :func:`unfold_conv_input_kernel_major` and :func:`unfold_conv_input`.
    """
    if isinstance(module, nn.Module):
        C, kernel_size = module.in_channels, module.kernel_size
        device = module.weight.device if device is None else device
    else:
        C = module
    K = prod(kernel_size)
    return torch.arange(C * K, device=device).reshape(C, K).T.reshape(-1)


def _zero_padding(module: Geometry) -> list[int]:
    """Zero padding as an ``F.pad`` argument (last spatial axis first, left then right)."""
    padding = module.padding
    if padding == "valid":
        padding = [0] * len(module.kernel_size)
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        if padding == "same":  # PyTorch puts the odd remainder on the right
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [padding[i], padding[i]]
    return pads
