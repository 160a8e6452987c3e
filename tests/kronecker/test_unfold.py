"""Input unfolding reproduces the convolution as a matrix product on patches."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, build, generator
from torch import nn

from curvops.kronecker.unfold import (
    kernel_major_order,
    unfold_conv_input,
    unfold_conv_input_kernel_major,
)

CONVS = {
    "1d-stride-pad": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (7,)),
    "1d-dilation-reflect": (
        lambda: nn.Conv1d(2, 3, 2, dilation=2, padding=2, padding_mode="reflect"),
        (6,),
    ),
    "2d-mixed": (
        lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        (5, 6),
    ),
    "2d-same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), (4, 5)),
    "1d-same-even-kernel": (lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=1), (6,)),
    "2d-same-dilated-even": (
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(3, 1)),
        (7, 5),
    ),
    "2d-valid-reflect-same": (
        lambda: nn.Conv2d(2, 3, 2, padding="same", padding_mode="reflect"),
        (4, 4),
    ),
    "1d-valid": (lambda: nn.Conv1d(2, 3, 3, padding="valid", stride=2), (8,)),
    "2d-circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (4, 4)),
    "3d": (lambda: nn.Conv3d(2, 3, 2, padding=1, dilation=(1, 2, 1), bias=False), (3, 4, 3)),
    "3d-valid-replicate": (
        lambda: nn.Conv3d(2, 3, 2, stride=2, padding=1, padding_mode="replicate"),
        (4, 3, 4),
    ),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
def test_patches_times_weight_is_conv(name):
    factory, spatial = CONVS[name]
    conv = build(factory)
    x = torch.randn(3, 2, *spatial, generator=generator(0), dtype=DTYPE)
    if name.startswith("2d-mixed"):  # a non-contiguous input
        x = torch.randn(3, *spatial, 2, generator=generator(0), dtype=DTYPE).movedim(-1, 1)
    patches = unfold_conv_input(conv, x)
    out = patches @ conv.weight.reshape(conv.out_channels, -1).T
    if conv.bias is not None:
        out = out + conv.bias
    expected = conv(x).flatten(start_dim=2).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_patches_are_a_view_of_a_feature_major_buffer():
    """Gram sums of the patches need no copy (see curvops.kronecker.gram)."""
    conv = build(lambda: nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(4, 2, 5, 5, generator=generator(0), dtype=DTYPE)
    patches = unfold_conv_input(conv, x)
    assert patches.shape == (4, 25, 18)
    assert patches.permute(2, 0, 1).is_contiguous()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
def test_kernel_major_patches_are_permuted_patches(name):
    factory, spatial = CONVS[name]
    conv = build(factory)
    x = torch.randn(3, 2, *spatial, generator=generator(1), dtype=DTYPE)
    patches = unfold_conv_input(conv, x)
    kernel_major = unfold_conv_input_kernel_major(conv, x)
    assert kernel_major.stride(-1) == 1
    order = kernel_major_order(conv)
    assert sorted(order.tolist()) == list(range(patches.shape[-1]))
    torch.testing.assert_close(kernel_major, patches[..., order], rtol=0, atol=0)
