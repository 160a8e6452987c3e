"""Recording the uses of tracked weights in a forward pass (NOTE [weight uses])."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.kronecker_problems import DTYPE, batches, build, generator
from torch import nn

from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator
from curvops.kronecker.uses import CONV, EMBEDDING, LINEAR, ConvGeometry, UseRecorder


def test_recorder_sees_layer_calls_and_other_uses():
    W = torch.randn(3, 2, dtype=DTYPE, requires_grad=True)
    b = torch.randn(3, dtype=DTYPE, requires_grad=True)
    K = torch.randn(4, 2, 3, 3, dtype=DTYPE, requires_grad=True)
    E = torch.randn(5, 2, dtype=DTYPE, requires_grad=True)
    untracked = torch.randn(3, 2, dtype=DTYPE, requires_grad=True)
    recorder = UseRecorder([W, b, K, E, untracked], range(4))
    x = torch.randn(6, 2, dtype=DTYPE)
    with recorder.recording():
        F.linear(x, W, b)
        F.linear(x, untracked, bias=b)  # a call of the tracked bias alone
        F.conv2d(torch.randn(1, 2, 5, 5, dtype=DTYPE), K, None, 1, "same", dilation=2)
        F.embedding(torch.tensor([[0, 4]]), E, padding_idx=-1)
        _ = W.shape, W.dtype, W.size(0), W.to(DTYPE), W.detach()  # no uses
        x @ E.T  # a use KFAC has no factors for
        F.linear(W, untracked)  # W as an input
    calls = recorder.calls
    assert [(c.kind, c.weight, c.bias) for c in calls] == [
        (LINEAR, 0, 1),
        (LINEAR, None, 1),
        (CONV, 2, None),
        (EMBEDDING, 3, None),
    ]
    assert calls[2].options == ConvGeometry((3, 3), (1, 1), "same", (2, 2), 1, 2)
    assert calls[3].options.padding_idx == 4
    assert calls[0].out_shape == (6, 3) and calls[0].edge is not None
    assert recorder.unsupported == {
        3: ["torch.Tensor.T.__get__"],
        0: ["torch.nn.functional.linear (not as its weight or bias)"],
    }
    assert torch._C._len_torch_function_stack() == 0


def _net(inplace: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 2))


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_inplace_activation_after_a_layer_leaves_its_output_gradients_right(fisher_type):
    """ReLU(inplace=True) overwrites the first layer's output; its gradients are still
    taken at the layer's output (the gradient edge recorded at the call)."""
    g = generator(1)
    data = batches(
        torch.randn(9, 3, generator=g, dtype=DTYPE),
        torch.randn(9, 2, generator=g, dtype=DTYPE),
        sizes=(4, 5),
    )
    factors = []
    for inplace in (False, True):
        model = build(lambda inplace=inplace: _net(inplace))
        K = KFACLinearOperator(
            model, nn.MSELoss(), list(model.parameters()), data, fisher_type=fisher_type
        )
        factors.append(K.factors["0"].gradient_factor)
    torch.testing.assert_close(factors[1], factors[0], rtol=1e-13, atol=0)


def test_ekfac_state_round_trip_with_a_convolution():
    model = build(lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(27, 2)))
    g = generator(2)
    data = [(torch.randn(5, 2, 4, 4, generator=g, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE))]
    params = list(model.parameters())
    E = EKFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="type-2")
    loaded = EKFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="type-2")
    loaded.load_state_dict(E.state_dict())
    torch.testing.assert_close(loaded.to_dense(), E.to_dense(), rtol=0, atol=0)


class Counting(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.inner(x)


def test_standard_modules_need_no_forward_pass_to_find_the_layers():
    """NOTE [layers of standard modules]: without a fallback the layers of standard modules
    are known from the model; with one, a forward pass on the first batch finds them. Both
    give the same factors."""
    model = Counting(build(lambda: _net(False)))
    g = generator(3)
    data = [(torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE))]
    params = list(model.parameters())
    options = {"fisher_type": "type-2", "check_deterministic": False}
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, **options)
    assert model.forwards == 0
    K_probed = KFACLinearOperator(model, nn.MSELoss(), params, data, fallback="diagonal", **options)
    assert model.forwards == 1
    assert torch.equal(K.to_dense(), K_probed.to_dense())


def _kfac(forward, params, data, **kwargs):
    return KFACLinearOperator(forward, nn.MSELoss(), params, data, **kwargs)


def test_calls_of_a_shared_weight_on_different_data_axes_are_refused():
    W = build(lambda: nn.Linear(2, 2)).weight
    data = [(torch.randn(3, 2, 2, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE))]

    def forward(p, X):
        return F.linear(X[:, 0], p[0]) + F.linear(X.reshape(-1, 2), p[0]).reshape(3, 2, 2)[:, 0]

    with pytest.raises(ValueError, match=r"Linear '0'.*different leading \(data\) axes \[3, 6\]"):
        _kfac(forward, [W], data).compute_factors()


def test_layer_input_changed_in_place_is_refused():
    lin = build(lambda: nn.Linear(2, 2))
    data = [(torch.randn(3, 2, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE))]

    def forward(p, X):
        h = X + 1
        out = F.linear(h, p[0], p[1])
        h.mul_(2)
        return out + h

    K = _kfac(forward, list(lin.parameters()), data, check_deterministic=False)
    with pytest.raises(ValueError, match=r"input of a call of torch.nn.functional.linear.*'0'"):
        K.compute_factors()


def test_layer_not_used_in_a_batch_is_refused():
    model = build(lambda: nn.Linear(2, 2))
    data = [(torch.randn(n, 2, dtype=DTYPE), torch.randn(n, 2, dtype=DTYPE)) for n in (3, 2)]

    def forward(p, X):
        return F.linear(X, p[0], p[1]) if X.shape[0] == 3 else X * 1.0

    K = _kfac(forward, list(model.parameters()), data, check_deterministic=False)
    with pytest.raises(ValueError, match="Linear '0' holds parameters.*not used in the forward"):
        K.compute_factors()
