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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_FUNCS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def unfold_conv_input(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """Extract the input patches a convolution multiplies with its weight.

    Args:
        module: The convolution (``groups == 1``).
        x: Its input, ``[N, C_in, *spatial]``.

    Returns:
        The patches, ``[N, P, C_in * prod(kernel_size)]`` with ``P`` output positions, such
        that ``patches @ module.weight.reshape(C_out, -1).T + bias`` equals the layer output
        with its spatial axes flattened to ``P`` and moved before the channels.
    """
    kernel_size = tuple(module.kernel_size)
    padding = module.padding
    if module.padding_mode != "zeros":
        # the module pads explicitly in this case and convolves without padding
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    # a grouped convolution with one-hot kernels copies every tap of a patch into its own
    # output channel, ordered (channel, kernel offset) like the flat weight; this works for
    # 1d/2d/3d and string paddings, and is faster than F.unfold (im2col) on CPU
    channels, taps = x.shape[1], prod(kernel_size)
    one_hot = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, *kernel_size)
    one_hot = one_hot.repeat(channels, *([1] * (len(kernel_size) + 1)))
    patches = _CONV_FUNCS[len(kernel_size)](
        x,
        one_hot,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=channels,
    )
    return patches.flatten(start_dim=2).transpose(1, 2)
