"""Per-layer-type math: convolutions equal linear layers on unfolded patches; layer checks."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.kronecker_problems import (
    DTYPE,
    batches,
    block_diagonal,
    build,
    generator,
    module_groups,
)
from torch import Tensor, nn

from curvops.kronecker import KFACLinearOperator
from curvops.kronecker.layers import ConvLayer, LinearLayer, supported_layer_type
from curvops.kronecker.unfold import unfold_conv_input
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ggn

N = 12


class UnfoldedConv(nn.Module):
    """A convolution written as an nn.Linear on unfolded input patches (same parameters)."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d):
        super().__init__()
        self.conv = conv  # configuration only; its parameters are not used
        self.linear = nn.Linear(
            conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None
        )
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def _patches(self, x: Tensor) -> Tensor:
        if isinstance(self.conv, nn.Conv2d):  # PyTorch's own unfold, independent of curvops
            c = self.conv
            p = torch.nn.functional.unfold(
                x, c.kernel_size, dilation=c.dilation, padding=c.padding, stride=c.stride
            )
            return p.transpose(1, 2)
        return unfold_conv_input(self.conv, x)  # verified against the conv in test_unfold.py

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(self._patches(x))  # [N, P, C_out]
        out_spatial = self.conv(x).shape[2:]
        return z.transpose(1, 2).reshape(x.shape[0], -1, *out_spatial)


CONVS = {
    "1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), (7,)),
    "2d": (lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=1, dilation=(1, 2)), (5, 6)),
    "3d": (lambda: nn.Conv3d(2, 2, 2, padding=1), (3, 3, 2)),
}


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("dim", list(CONVS))
def test_conv_kfac_equals_kfac_of_linear_on_unfolded_patches(
    dim, kfac_approx, fisher_type, separate
):
    factory, spatial = CONVS[dim]
    conv = build(factory)
    g = generator(1)
    X = torch.randn(N, 2, *spatial, generator=g, dtype=DTYPE)
    flat = conv(X).shape[1:].numel()
    head = build(lambda: nn.Linear(flat, 3), seed=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    twin = nn.Sequential(
        UnfoldedConv(copy.deepcopy(conv)), nn.Tanh(), nn.Flatten(), copy.deepcopy(head)
    ).to(DTYPE)
    data = batches(X, torch.randint(0, 3, (N,), generator=g))
    loss = nn.CrossEntropyLoss()
    torch.testing.assert_close(model(X), twin(X))
    options = {
        "fisher_type": fisher_type,
        "kfac_approx": kfac_approx,
        "separate_weight_and_bias": separate,
    }
    K_conv = KFACLinearOperator(model, loss, list(model.parameters()), data, **options)
    twin_params = list(twin[0].linear.parameters()) + list(twin[3].parameters())
    K_lin = KFACLinearOperator(twin, loss, twin_params, data, **options)
    f_conv, f_lin = K_conv.factors["0"], K_lin.factors["0.linear"]
    torch.testing.assert_close(f_conv.input_factor, f_lin.input_factor)
    torch.testing.assert_close(f_conv.gradient_factor, f_lin.gradient_factor)
    torch.testing.assert_close(f_conv.bias_input_factor, f_lin.bias_input_factor)
    torch.testing.assert_close(K_conv.to_dense(), K_lin.to_dense())


def test_pointwise_conv_net_with_mse_per_location_is_exact():
    """1x1 convolutions act position-wise; with MSE on every location KFAC-expand is exact."""
    model = build(lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1)))
    params = list(model.parameters())
    g = generator(3)
    data = batches(
        torch.randn(N, 2, 2, 3, generator=g, dtype=DTYPE),
        torch.randn(N, 2, 2, 3, generator=g, dtype=DTYPE),
    )
    loss = nn.MSELoss()
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=False
    )
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, False)
    )
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)


def test_supported_layer_types():
    class MyLinear(nn.Linear):
        pass

    class ChangedLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert supported_layer_type(nn.Linear(2, 2)) is LinearLayer
    assert supported_layer_type(MyLinear(2, 2)) is LinearLayer
    assert supported_layer_type(nn.Conv3d(1, 1, 1)) is ConvLayer
    assert supported_layer_type(ChangedLinear(2, 2)) is None
    assert supported_layer_type(nn.ConvTranspose2d(1, 1, 1)) is None
    assert supported_layer_type(nn.LayerNorm(2)) is None


def _kfac(model, X, y, loss=None, **kwargs):
    loss = nn.MSELoss() if loss is None else loss
    return KFACLinearOperator(
        model, loss, list(model.parameters()), [(X, y)], check_deterministic=False, **kwargs
    )


def test_grouped_conv_is_refused():
    model = build(lambda: nn.Sequential(nn.Conv1d(2, 2, 1, groups=2)))
    X = torch.randn(3, 2, 4, dtype=DTYPE)
    with pytest.raises(NotImplementedError, match="groups=2"):
        _kfac(model, X, torch.randn(3, 2, 4, dtype=DTYPE))


def test_embedding_options_are_refused():
    ids = torch.zeros(3, 2, dtype=torch.long)
    y = torch.randn(3, 2, 2, dtype=DTYPE)
    model = build(lambda: nn.Sequential(nn.Embedding(4, 2, max_norm=1.0)))
    with pytest.raises(NotImplementedError, match="max_norm"):
        _kfac(model, ids, y)
    model = build(lambda: nn.Sequential(nn.Embedding(4, 2)))
    with pytest.raises(NotImplementedError, match="use kfac_approx='expand'"):
        _kfac(model, ids, y, kfac_approx="reduce")


def test_unbatched_input_is_refused():
    model = build(lambda: nn.Sequential(nn.Conv1d(1, 1, 2)))
    X = torch.randn(1, 5, dtype=DTYPE)  # unbatched [C, L]
    K = _kfac(model, X, torch.randn(1, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="without a batch axis"):
        K.compute_factors()
