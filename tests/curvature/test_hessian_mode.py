"""The Hessian's default mode, chosen by the model's operations (NOTE [Hessian mode by model])."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import HessianLinearOperator
from curvops.curvature.products import HessianMode, called_functions, hessian_mode_for
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_hessian

ROR, FOR = HessianMode.REVERSE_OVER_REVERSE, HessianMode.FORWARD_OVER_REVERSE
TOL = {"rtol": 1e-8, "atol": 1e-10}


class _TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v, is_causal=True)).mean(1)


class _NoJvp(torch.autograd.Function):
    """``tanh`` with a backward rule but no forward-mode (jvp) rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _PoolThenNoJvp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.lin = nn.Linear(8, 3)
        self.tanh = _NoJvp.apply  # torch.tanh for the dense reference

    def forward(self, x):
        return self.lin(self.tanh(F.max_pool2d(self.conv(x), 2).flatten(1)))


class _FunctionalMaxPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2)  # a functional call, no pooling module


def _model(name):
    if name == "attention":
        return _TinyAttention()
    if name == "no-jvp":
        return _PoolThenNoJvp()
    layers = {
        "mlp": [nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)],
        "cnn-maxpool": [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2)],
        "cnn-avgpool": [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(2)],
        "cnn-maxpool-batchnorm": [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2)],
        "cnn-functional-maxpool": [nn.Conv2d(1, 2, 3), nn.Tanh(), _FunctionalMaxPool()],
    }[name]
    head = [] if name == "mlp" else [nn.Flatten(), nn.Linear(8, 3)]  # 2 x 2 x 2 -> 3
    return nn.Sequential(*layers, *head)


CASES = {  # model -> the mode the rule picks
    "mlp": ROR,
    "cnn-maxpool": FOR,
    "cnn-functional-maxpool": FOR,
    "cnn-avgpool": ROR,
    "cnn-maxpool-batchnorm": ROR,
    "attention": ROR,
}


def _problem(name, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model(name).double().eval()
        shape = {"mlp": (8,), "attention": (3, 4)}.get(name, (1, 6, 6))
        data = [
            (torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (3, 2)
        ]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def test_the_rule_on_function_names():
    assert hessian_mode_for({"linear", "relu", "cross_entropy"})[0] == ROR
    assert hessian_mode_for({"conv2d", "relu", "max_pool2d", "linear"})[0] == FOR
    assert hessian_mode_for({"conv1d", "adaptive_max_pool1d"})[0] == FOR
    mode, why = hessian_mode_for({"conv2d", "batch_norm", "max_pool2d_with_indices"})
    assert mode == ROR and "batch_norm" in why and "max_pool2d_with_indices" in why
    assert hessian_mode_for({"max_pool2d", "scaled_dot_product_attention"})[0] == ROR
    assert hessian_mode_for({"conv2d", "avg_pool2d"})[0] == ROR


def test_called_functions_sees_modules_and_functional_calls():
    model, loss_func, params, data = _problem("cnn-functional-maxpool")
    X, y = data[0]
    names = [n for n, _ in model.named_parameters()]

    def loss(*p):
        return loss_func(torch.func.functional_call(model, dict(zip(names, p)), (X,)), y)

    called = called_functions(loss, params)
    assert {"conv2d", "max_pool2d", "linear", "cross_entropy"} <= called
    state = torch.get_rng_state()
    assert "dropout" in called_functions(lambda *p: F.dropout(loss(*p), 0.5), params)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", list(CASES))
def test_default_mode_by_model_and_both_modes_equal_the_dense_reference(name):
    model, loss_func, params, data = _problem(name)
    dense = dense_hessian(model, loss_func, params, data)
    lazy = HessianLinearOperator(model, loss_func, params, data, check_deterministic=False)
    assert lazy.hessian_mode is None  # decided at the first product
    H = HessianLinearOperator(model, loss_func, params, data)
    assert_operator_matches(H, dense, **TOL)
    assert H.hessian_mode == CASES[name], H._product_plan.hessian_reason
    for mode in (ROR, FOR):
        explicit = HessianLinearOperator(
            model, loss_func, params, data, mode=mode.value, check_deterministic=False
        )
        assert explicit.hessian_mode == mode
        torch.testing.assert_close(explicit.to_dense(), dense, **TOL)
        assert explicit._product_plan.hessian_mode is None  # an explicit mode decides nothing


@pytest.mark.parametrize("name", ["cnn-maxpool", "mlp"])
def test_default_products_are_bitwise_reproducible_across_instances(name):
    model, loss_func, params, data = _problem(name)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    V = torch.randn(v.shape[0], 3, dtype=torch.float64)
    first = HessianLinearOperator(model, loss_func, params, data)
    second = HessianLinearOperator(model, loss_func, params, data)
    a, b = first @ v, second @ v
    assert torch.equal(a, b) and torch.equal(a, first @ v)
    assert torch.equal(first @ V, second @ V)
    # a multi-column pass may batch its backward (NOTE [columns per pass]): equal to round-off
    torch.testing.assert_close((first @ V)[:, 0], first @ V[:, 0], rtol=1e-12, atol=1e-14)
    explicit = HessianLinearOperator(model, loss_func, params, data, mode=CASES[name].value)
    assert torch.equal(explicit @ v, a)  # the default is exactly the chosen mode


def test_forward_mode_failure_falls_back_to_reverse_over_reverse():
    model, loss_func, params, data = _problem("no-jvp")
    explicit = HessianLinearOperator(
        model, loss_func, params, data, mode="forward-over-reverse", check_deterministic=False
    )
    v = torch.randn(explicit.shape[1], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="jvp"):
        explicit @ v  # an explicit choice is kept: its error reaches the caller
    H = HessianLinearOperator(model, loss_func, params, data)
    reference = _model("no-jvp").double()
    reference.load_state_dict(model.state_dict())
    reference.tanh = torch.tanh  # the same function, with PyTorch's own derivatives
    dense = dense_hessian(reference, loss_func, list(reference.parameters()), data)
    assert_operator_matches(H, dense, **TOL)
    assert H.hessian_mode == ROR
    assert "forward-over-reverse failed" in H._product_plan.hessian_reason


def test_mode_by_model_needs_a_plan():
    from curvops.curvature.products import hessian_matmat

    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="mode='by-model' needs a ProductPlan"):
        hessian_matmat(lambda w: (w**2).sum(), p, [torch.ones(1, 2)], mode="by-model")
