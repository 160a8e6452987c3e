"""Empty batches are skipped (NOTE [empty batches]): they contribute nothing and no NaN."""

import pytest
import torch
from helpers.operator_zoo import OPERATOR_KINDS, build_operator, classification_batches, mlp
from torch import nn


def _with_empty_batches(data):
    X, y = data[0]
    empty = (X[:0], y[:0])
    return [empty, data[0], empty, *data[1:], empty]


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_empty_batches_change_nothing(kind, check):
    model, data = mlp(), classification_batches()
    params, loss = list(model.parameters()), nn.CrossEntropyLoss()
    A = build_operator(kind, model, loss, params, data)
    padded = _with_empty_batches(data)
    B = build_operator(kind, model, loss, params, padded, check_deterministic=check)
    assert B.shape == A.shape
    V = torch.randn(A.shape[1], 3, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    torch.testing.assert_close(B @ V, A @ V, rtol=1e-12, atol=1e-14)
    U = torch.randn(2, A.shape[0], generator=torch.Generator().manual_seed(1), dtype=A.dtype)
    torch.testing.assert_close(U @ B, U @ A, rtol=1e-12, atol=1e-14)


def test_gradient_and_loss_skip_empty_batches():
    model, data = mlp(), classification_batches()
    params, loss = list(model.parameters()), nn.CrossEntropyLoss()
    A = build_operator("ggn", model, loss, params, data)
    padded = _with_empty_batches(data)
    B = build_operator("ggn", model, loss, params, padded, check_deterministic=False)
    (grad_a, loss_a), (grad_b, loss_b) = A.gradient_and_loss(), B.gradient_and_loss()
    assert torch.isfinite(loss_b)
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(grad_b, grad_a)
    assert B.num_data == A.num_data == 7


def test_only_empty_batches_is_empty_data():
    model, data = mlp(), classification_batches()
    X, y = data[0]
    only_empty = [(X[:0], y[:0])]
    with pytest.raises(ValueError, match="The data is empty"):
        build_operator("ggn", model, nn.CrossEntropyLoss(), list(model.parameters()), only_empty)
