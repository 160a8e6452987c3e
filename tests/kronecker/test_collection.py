"""The statistics pass: one forward and one batched backward per batch; call-count checks."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, build
from torch import nn

import curvops.kronecker.collection as collection
from curvops.kronecker import KFACLinearOperator


def test_layer_whose_weights_are_used_without_calling_it_is_refused():
    """nn.MultiheadAttention uses out_proj.weight without calling out_proj: the error names
    the parameter and the function; with a fallback the parameters use it."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = build(Attention)
    X = torch.randn(3, 2, 4, dtype=DTYPE)
    params = list(model.attn.out_proj.parameters())
    data = [(X, torch.randn(3, 2, 4, dtype=DTYPE))]
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, check_deterministic=False)
    with pytest.raises(
        ValueError,
        match=r"'attn.out_proj.weight' is used by torch.nn.functional.multi_head_attention_"
        r"forward, which KFAC has no Kronecker factors for.*fallback='diagonal'",
    ):
        K.compute_factors()
    K = KFACLinearOperator(
        model, nn.MSELoss(), params, data, check_deterministic=False, fallback="diagonal"
    )
    assert K._layers == [] and K._fallback_indices == [0, 1]
    K.compute_factors()


def test_one_batched_backward_per_batch(monkeypatch):
    """Type-2 with C classes backpropagates all C columns in one vectorised call."""
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)))
    data = [(torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 5, (4,))) for _ in range(3)]
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    K = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        data,
        fisher_type="type-2",
        check_deterministic=False,
    )
    monkeypatch.setattr(torch.autograd, "grad", counting)
    K.compute_factors()
    assert calls == [True, True, True]


@pytest.mark.parametrize(
    ("fisher_type", "mc_samples", "batched"),
    [("empirical", 1, False), ("mc", 1, False), ("mc", 3, True)],
)
def test_single_factor_uses_a_plain_backward(monkeypatch, fisher_type, mc_samples, batched):
    """One output factor per datum is backpropagated without vectorisation, same factors."""
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)))
    data = [(torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 5, (4,))) for _ in range(2)]
    options = {"fisher_type": fisher_type, "mc_samples": mc_samples}
    K = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data, **options)
    calls = []
    original = torch.autograd.grad

    def recording(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    dense = K.to_dense()
    assert calls == [batched, batched]
    # the same factors from a vectorised backward of the same output factors
    monkeypatch.setattr(torch.autograd, "grad", original)

    def vectorised(output, layer_outputs, S, retain_graph=False):
        return list(
            torch.autograd.grad(
                output, layer_outputs, S, is_grads_batched=True, retain_graph=retain_graph
            )
        )

    monkeypatch.setattr(collection, "_backpropagate", vectorised)
    K.compute_factors()
    torch.testing.assert_close(K.to_dense(), dense)


def test_forward_only_backpropagates_nothing(monkeypatch):
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)))
    data = [(torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 5, (4,)))]
    K = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        data,
        fisher_type="forward-only",
        check_deterministic=False,
    )

    def fail(*args, **kwargs):
        raise AssertionError("forward-only must not backpropagate")

    monkeypatch.setattr(torch.autograd, "grad", fail)
    K.compute_factors()


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_output_factors_in_chunks_give_the_same_factors(monkeypatch, fisher_type):
    """NOTE [chunks of output factors]: any chunking of the factors gives the same KFAC/EKFAC."""
    from curvops import EKFACLinearOperator

    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)))
    data = [(torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 5, (4,))) for _ in range(2)]
    params = list(model.parameters())
    options = {"fisher_type": fisher_type, "mc_samples": 5 if fisher_type == "mc" else 1}
    whole = [
        cls(model, nn.CrossEntropyLoss(), params, data, **options).to_dense()
        for cls in (KFACLinearOperator, EKFACLinearOperator)
    ]
    per_factor = 4 * (4 + 5) + 4 * 5  # entries of both layer outputs and the column per factor
    monkeypatch.setattr(collection, "FACTOR_CHUNK_ELEMENTS", 2 * per_factor)  # 2 + 2 + 1
    sizes = []
    original = collection._backpropagate

    def recording(output, layer_outputs, S, retain_graph=False):
        sizes.append(S.shape[0])
        return original(output, layer_outputs, S, retain_graph=retain_graph)

    monkeypatch.setattr(collection, "_backpropagate", recording)
    chunked = [
        cls(model, nn.CrossEntropyLoss(), params, data, **options).to_dense()
        for cls in (KFACLinearOperator, EKFACLinearOperator)
    ]
    assert sizes[:3] == [2, 2, 1]
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b)
