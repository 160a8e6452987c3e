"""KFAC/EKFAC on callables ``(params, X) -> output``: the factors of the equivalent module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.kronecker_problems import DTYPE, batches, build, generator
from torch import Tensor, nn

from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator

N = 9


def mlp_module() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def mlp(p: list[Tensor], X: Tensor) -> Tensor:
    return F.linear(F.relu(F.linear(X, p[0], p[1])), p[2], p[3])


def mlp_data(seed: int = 1):
    g = generator(seed)
    X = torch.randn(N, 4, generator=g, dtype=DTYPE)
    return batches(X, torch.randint(0, 3, (N,), generator=g), sizes=(4, 5))


def _assert_same_factors(K_a: KFACLinearOperator, K_b: KFACLinearOperator) -> None:
    assert list(K_a.factors) == list(K_b.factors)
    for name, f in K_a.factors.items():
        for key, t in f.tensors().items():
            assert torch.equal(t, K_b.factors[name].tensors()[key]), (name, key)
    assert torch.equal(K_a.to_dense(), K_b.to_dense())


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_callable_mlp_has_the_modules_factors(fisher_type, kfac_approx):
    """Same parameter tensors, same calls: bitwise the same factors as the nn.Module."""
    model = build(mlp_module)
    params = list(model.parameters())
    data, loss = mlp_data(), nn.CrossEntropyLoss()
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx}
    K_fn = KFACLinearOperator(mlp, loss, params, data, **options)
    K_mod = KFACLinearOperator(model, loss, params, data, **options)
    assert [layer.name for layer in K_fn._layers] == ["0", "2"]  # the weights' positions
    assert [layer.module for layer in K_fn._layers] == [None, None]
    _assert_same_factors(K_fn, K_mod)
    if fisher_type != "forward-only":
        E_fn = EKFACLinearOperator(mlp, loss, params, data, **options)
        E_mod = EKFACLinearOperator(model, loss, params, data, **options)
        assert torch.equal(E_fn.to_dense(), E_mod.to_dense())


def test_callable_with_a_dict_of_parameters_names_layers_like_modules():
    model = build(mlp_module)
    params = dict(model.named_parameters())

    def forward(p: dict[str, Tensor], X: Tensor) -> Tensor:
        h = F.relu(F.linear(X, p["0.weight"], p["0.bias"]))
        return F.linear(h, p["2.weight"], p["2.bias"])

    data, loss = mlp_data(), nn.CrossEntropyLoss()
    K_fn = KFACLinearOperator(forward, loss, params, data, fisher_type="type-2")
    K_mod = KFACLinearOperator(model, loss, list(params.values()), data, fisher_type="type-2")
    _assert_same_factors(K_fn, K_mod)
    assert K_fn.factors["0"].weight_name == "0.weight"


class ConvEmbeddingNet(nn.Module):
    """Convolution (reflect padding), embedding and linear layers of one model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 2, padding_idx=4)
        self.conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(3 * 6, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.conv(self.emb(ids).transpose(1, 2)))
        return self.head(h.flatten(start_dim=1))


def conv_embedding(p: list[Tensor], ids: Tensor) -> Tensor:
    x = F.embedding(ids, p[0], padding_idx=4).transpose(1, 2)
    h = torch.tanh(F.conv1d(F.pad(x, (1, 1), mode="reflect"), p[1], p[2]))
    return F.linear(h.flatten(start_dim=1), p[3], p[4])


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_callable_conv_and_embedding_have_the_modules_factors(fisher_type):
    model = build(ConvEmbeddingNet)
    params = list(model.parameters())
    g = generator(2)
    ids = torch.randint(0, 5, (N, 6), generator=g)
    data = batches(ids, torch.randn(N, 2, generator=g, dtype=DTYPE), sizes=(4, 5))
    loss = nn.MSELoss()
    K_fn = KFACLinearOperator(conv_embedding, loss, params, data, fisher_type=fisher_type)
    K_mod = KFACLinearOperator(model, loss, params, data, fisher_type=fisher_type)
    assert [layer.type_name for layer in K_fn._layers] == ["Embedding", "Conv1d", "Linear"]
    assert list(K_mod.factors) == ["emb", "conv", "head"]
    for a, b in zip(K_fn.factors.values(), K_mod.factors.values()):
        for key, t in a.tensors().items():
            torch.testing.assert_close(t, b.tensors()[key], rtol=1e-13, atol=1e-15)
    E_fn = EKFACLinearOperator(conv_embedding, loss, params, data, fisher_type=fisher_type)
    E_mod = EKFACLinearOperator(model, loss, params, data, fisher_type=fisher_type)
    torch.testing.assert_close(E_fn.to_dense(), E_mod.to_dense(), rtol=1e-10, atol=1e-13)


def test_callable_with_an_unsupported_use_names_the_parameter_and_the_function():
    model = build(mlp_module)
    params = list(model.parameters())

    def matmul_mlp(p: list[Tensor], X: Tensor) -> Tensor:
        return F.linear(F.relu(X @ p[0].T + p[1]), p[2], p[3])

    data, loss = mlp_data(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"Parameter '0' is used by torch.Tensor.T.__get__"):
        KFACLinearOperator(matmul_mlp, loss, params, data)
    K = KFACLinearOperator(matmul_mlp, loss, params, data, fallback="diagonal")
    assert [layer.name for layer in K._layers] == ["2"] and K._fallback_indices == [0, 1]
    K_mod = KFACLinearOperator(model, loss, params, data, fallback="diagonal")
    torch.testing.assert_close(K.factors["2"].gradient_factor, K_mod.factors["2"].gradient_factor)


def test_layer_block_copies_keep_the_weight_without_a_module():
    model = build(mlp_module)
    K = KFACLinearOperator(mlp, nn.CrossEntropyLoss(), list(model.parameters()), mlp_data())
    layer = K._layers[0]
    bias_block = layer.block("0.bias", None, layer.bias_index)
    assert (bias_block.name, bias_block.weight_index, bias_block.bias_index) == ("0.bias", None, 1)
    assert bias_block.weight_shape == (5, 4) and bias_block.kinds == layer.kinds
    assert (layer.name, layer.weight_index) == ("0", 0)


def test_kfoc_of_a_callable_is_the_modules():
    from curvops.kronecker import KFOCLinearOperator

    model = build(mlp_module)
    params = list(model.parameters())
    data, loss = mlp_data(), nn.CrossEntropyLoss()
    K_fn = KFOCLinearOperator(mlp, loss, params, data, fisher_type="type-2")
    K_mod = KFOCLinearOperator(model, loss, params, data, fisher_type="type-2")
    torch.testing.assert_close(K_fn.to_dense(), K_mod.to_dense(), rtol=1e-12, atol=1e-15)
