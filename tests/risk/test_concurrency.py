"""Products from several threads equal single-threaded products (NOTE [threads])."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers.operator_zoo import OPERATOR_KINDS, build_operator, classification_batches, mlp
from torch import nn

from curvops import HessianLinearOperator, KFACInverseLinearOperator

NUM_THREADS = 4


def _in_threads(fn, args):
    """Run ``fn`` on every argument, all at once from :data:`NUM_THREADS` threads."""
    with ThreadPoolExecutor(max_workers=NUM_THREADS) as pool:
        return list(pool.map(fn, args))


def _inputs(A, count: int = 2 * NUM_THREADS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(A.shape[1],), (A.shape[1], 3)]  # vectors (forward mode) and matrices (vmap)
    return [torch.randn(*shapes[i % 2], generator=gen, dtype=A.dtype) for i in range(count)]


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_products_from_threads(kind):
    model, data = mlp(), classification_batches()
    params = list(model.parameters())
    A = build_operator(kind, model, nn.CrossEntropyLoss(), params, data)
    # a fresh operator, so that KFAC computes its factors inside the threads
    B = build_operator(kind, model, nn.CrossEntropyLoss(), params, data)
    inputs = _inputs(A)
    expected = [A @ v for v in inputs]
    for got, want in zip(_in_threads(lambda v: B @ v, inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


def test_forward_over_reverse_hessian_and_gradients_from_threads():
    model, data = mlp(), classification_batches()
    params = list(model.parameters())
    H = HessianLinearOperator(
        model, nn.CrossEntropyLoss(), params, data, mode="forward-over-reverse"
    )
    inputs = _inputs(H)
    expected = [H @ v for v in inputs]
    for got, want in zip(_in_threads(lambda v: H @ v, inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    grad, loss = H.gradient_and_loss()
    for g, value in _in_threads(lambda _: H.gradient_and_loss(), range(NUM_THREADS)):
        torch.testing.assert_close(value, loss, rtol=0, atol=0)
        torch.testing.assert_close(g, grad, rtol=0, atol=0)


def test_kfac_inverse_from_threads():
    model, data = mlp(), classification_batches()
    K = build_operator("kfac", model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    inverse = KFACInverseLinearOperator(K, damping=1e-2)
    inputs = _inputs(inverse)
    expected = [inverse @ v for v in inputs]
    for got, want in zip(_in_threads(lambda v: inverse @ v, inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_recomputing_stale_factors_from_threads(kind):
    model, data = mlp(), classification_batches()
    params, loss = list(model.parameters()), nn.CrossEntropyLoss()
    K = build_operator(kind, model, loss, params, data, on_stale="recompute")
    K @ torch.ones(K.shape[1], dtype=K.dtype)
    with torch.no_grad():
        params[0].mul_(1.5)
    fresh = build_operator(kind, model, loss, params, data)
    inputs = _inputs(K)
    for got, v in zip(_in_threads(lambda v: K @ v, inputs), inputs):
        torch.testing.assert_close(got, fresh @ v, rtol=1e-12, atol=1e-14)
