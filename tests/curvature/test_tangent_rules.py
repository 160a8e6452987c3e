"""The fast forward-mode rules: tangent and backward equal PyTorch's own, state untouched."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvops.curvature.tangent_rules import efficient_tangents

DT = torch.float64


class MethodActivations(nn.Module):
    """Activations called as tensor methods and torch functions."""

    def forward(self, x):
        return torch.sigmoid(torch.relu(x).tanh()) + x.relu() + x.sigmoid()


def _modules():
    gen = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(3).to(DT).eval()
    bn.running_mean.copy_(torch.randn(3, generator=gen, dtype=DT))
    bn.running_var.copy_(torch.rand(3, generator=gen, dtype=DT) + 0.5)
    return [
        (nn.Linear(5, 6), (2, 3, 5)),
        (nn.Linear(5, 6, bias=False), (4, 5)),
        (nn.Conv1d(3, 2, 2, padding=1), (2, 3, 5)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7)),
        (nn.Conv3d(2, 2, 2), (1, 2, 3, 3, 3)),
        (nn.Conv2d(3, 2, 3, padding="same", bias=False), (2, 3, 5, 5)),  # native rule
        (nn.Conv2d(3, 2, 3, dilation=2, groups=1), (3, 7, 7)),  # unbatched: native rule
        (bn, (2, 3, 4, 4)),
        (nn.BatchNorm1d(3, affine=False).to(DT).eval(), (4, 3)),
        (nn.LayerNorm([4, 5]), (3, 4, 5)),
        (nn.LayerNorm(5, elementwise_affine=False), (3, 5)),
        (nn.Sequential(nn.Linear(5, 5), nn.ReLU()), (4, 5)),
        (nn.Sequential(nn.Linear(5, 5), MethodActivations()), (4, 5)),
        (nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Sigmoid()), (4, 5)),
        (nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.SiLU()), (4, 5)),
        (nn.Sequential(nn.Linear(5, 5), nn.GELU(approximate="tanh")), (4, 5)),
        (nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(2)), (2, 2, 5, 5)),
        (nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(3, stride=2, padding=1)), (2, 2, 6, 6)),
        (nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(2, ceil_mode=True)), (2, 5, 5)),
        (nn.Sequential(nn.Linear(5, 5), nn.ReLU(inplace=True)), (4, 5)),  # native rule
    ]


@pytest.mark.parametrize("index", range(20))
@pytest.mark.parametrize("input_tangent", [False, True])
def test_rules_match_native_autodiff(index, input_tangent):
    module, shape = _modules()[index]
    module = module.to(DT)
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(shape, generator=gen, dtype=DT)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach() for p in module.parameters()]
    tangents = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
    dx = torch.randn(shape, generator=gen, dtype=DT) if input_tangent else torch.zeros(shape)

    def f(x_, *p):
        return functional_call(module, dict(zip(names, p)), (x_,))

    expected = jvp(f, (x, *params), (dx.to(DT), *tangents))[1]
    leaves = [p.clone().requires_grad_() for p in params]
    x_leaf = x.clone().requires_grad_()
    with fwAD.dual_level(), efficient_tangents():
        x_in = fwAD.make_dual(x_leaf, dx.to(DT)) if input_tangent else x_leaf
        duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)]
        out, tangent = fwAD.unpack_dual(f(x_in, *duals))
    if tangent is None:  # nothing had a tangent (a module without parameters)
        assert not params and not input_tangent and not expected.any()
    else:
        torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)
    # the backward pass through the custom node equals PyTorch's
    u = torch.randn(out.shape, generator=gen, dtype=DT)
    got = torch.autograd.grad(out, [x_leaf, *leaves], u)
    ref = torch.autograd.grad(f(x_leaf, *leaves), [x_leaf, *leaves], u)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in module.parameters())


def test_keyword_arguments_and_no_tangent_calls():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=gen, dtype=DT)
    w = torch.randn(2, 4, generator=gen, dtype=DT)
    dw = torch.randn(2, 4, generator=gen, dtype=DT)
    with fwAD.dual_level(), efficient_tangents():
        plain = F.linear(x, weight=w)  # no tangent anywhere: native call
        assert fwAD.unpack_dual(plain).tangent is None
        out = F.linear(input=x, weight=fwAD.make_dual(w, dw))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, x @ dw.T)


def test_batch_norm_in_train_mode_uses_native_rule():
    bn = nn.BatchNorm1d(3).to(DT).train()
    x = torch.randn(5, 3, dtype=DT)
    dw = torch.randn(3, dtype=DT)
    names = [n for n, _ in bn.named_parameters()]
    params = [p.detach() for p in bn.parameters()]

    def f(w, b):
        return functional_call(bn, dict(zip(names, (w, b))), (x,))

    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with fwAD.dual_level():  # PyTorch's own rule
        expected = fwAD.unpack_dual(f(fwAD.make_dual(params[0], dw), params[1])).tangent
    bn.load_state_dict(state)  # train mode updated the running statistics
    with fwAD.dual_level(), efficient_tangents():
        out = f(fwAD.make_dual(params[0], dw), params[1])
        got = fwAD.unpack_dual(out).tangent
    bn.load_state_dict(state)
    torch.testing.assert_close(got, expected)


def test_attention_with_dropout_is_refused():
    q = torch.randn(1, 1, 3, 2, dtype=DT)
    with fwAD.dual_level(), efficient_tangents():
        dual = fwAD.make_dual(q, torch.ones_like(q))
        with pytest.raises(NotImplementedError, match="dropout_p=0.1 makes the model stochastic"):
            F.scaled_dot_product_attention(dual, q, q, dropout_p=0.1)


def test_learned_additive_mask_falls_back_to_differentiable_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 3, 2, generator=gen, dtype=DT) for _ in range(3))
    mask = torch.randn(3, 3, generator=gen, dtype=DT).requires_grad_()
    dq = torch.randn(q.shape, generator=gen, dtype=DT)
    with fwAD.dual_level(), efficient_tangents():
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, dq), k, v, attn_mask=mask)
        got = fwAD.unpack_dual(out).tangent
    with sdpa_kernel([SDPBackend.MATH]):
        expected = jvp(
            lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=mask.detach()), (q,), (dq,)
        )[1]
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(out.sum(), mask)  # the mask's gradient flows
    assert grad.shape == mask.shape
