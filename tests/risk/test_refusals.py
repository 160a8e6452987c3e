"""Contexts and layers curvops refuses with a clear message (or handles), never cryptically."""

import pytest
import torch
from torch import nn

from curvops import (
    EFLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)
from curvops.testing import dense_ggn, dense_hessian


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def _all(model, loss_func, params, data):
    return {
        "ggn": lambda: GGNLinearOperator(model, loss_func, params, data),
        "hessian": lambda: HessianLinearOperator(model, loss_func, params, data),
        "ef": lambda: EFLinearOperator(model, loss_func, params, data),
        "kfac": lambda: KFACLinearOperator(model, loss_func, params, data),
        "jacobian": lambda: JacobianLinearOperator(model, params, data),
    }


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac", "jacobian"])
def test_inference_mode_is_refused_clearly(kind):
    """NOTE [inference mode]: was "element 0 of tensors does not require grad" deep inside."""
    problem = _problem()
    build = _all(*problem)[kind]
    A = build()
    v = torch.randn(A.shape[1], dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.inference_mode\(\)"):
        build()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad\\(\\) is fine"):
        A @ v
    if kind not in ("jacobian",):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            A.gradient_and_loss()


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac", "jacobian"])
def test_no_grad_works(kind):
    """Under torch.no_grad() every operator builds and multiplies, with the same result."""
    problem = _problem()
    A = _all(*problem)[kind]()
    v = torch.randn(A.shape[1], dtype=torch.float64)
    expected = A @ v
    with torch.no_grad():
        torch.testing.assert_close(_all(*problem)[kind]() @ v, expected)
        torch.testing.assert_close(A @ v, expected)


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac"])
def test_embedding_max_norm_is_refused_without_mutating_the_weight(kind):
    """NOTE [in-place parameter updates]: a GGN used to change the weight by up to 1.98."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 2))
    model = model.double()
    before = model[0].weight.detach().clone()
    data = [(torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,)))]
    with pytest.raises(NotImplementedError, match=r"Embedding '0' uses max_norm=0.5.*emb.max_norm"):
        _all(model, nn.CrossEntropyLoss(), list(model.parameters()), data)[kind]()
    assert torch.equal(model[0].weight, before)


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).double()

    def forward(self, X):
        return self.linear(X["x"])


@pytest.mark.parametrize("kind", ["ggn", "hessian", "kfac"])
def test_dict_batches_with_missing_keys(kind):
    """Was a bare KeyError('x') from inside the model."""
    model, y = _DictModel(), torch.randint(0, 2, (4,))
    params = list(model.parameters())
    right = {"x": torch.randn(4, 3, dtype=torch.float64)}
    wrong = {"input": torch.randn(4, 3, dtype=torch.float64)}

    def build(data, batch_size_fn):
        cls = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator}.get(kind)
        cls = KFACLinearOperator if cls is None else cls
        A = cls(model, nn.CrossEntropyLoss(), params, data, batch_size_fn=batch_size_fn)
        return A @ torch.zeros(8, dtype=torch.float64)  # KFAC's factors: at the first product

    with pytest.raises(KeyError, match=r"batch_size_fn reads the input key 'x'.*\['input'\]"):
        build([(wrong, y)], lambda X: X["x"].shape[0])
    with pytest.raises(KeyError, match=r"The model reads the input key 'x'.*\['input'\]"):
        build([(wrong, y)], lambda X: 4)
    with pytest.raises(KeyError, match=r"The model reads the input key 'x'.*\['input'\]"):
        build([(right, y), (wrong, y)], lambda X: 4)  # the keys differ between batches
    build([(right, y)], lambda X: X["x"].shape[0])  # the right keys work


@pytest.mark.parametrize("hook", ["full_backward", "full_backward_pre"])
@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef", "kfac", "jacobian"])
def test_backward_hooks_are_refused(kind, hook):
    """NOTE [module hooks]: was PyTorch's message about setup_context."""
    model, loss_func, params, data = _problem()
    register = getattr(model[0], f"register_{hook}_hook")
    handle = register(lambda *args: None)
    with pytest.raises(ValueError, match=r"Linear '0' has a backward hook.*handle.remove\(\)"):
        _all(model, loss_func, params, data)[kind]()
    handle.remove()
    _all(model, loss_func, params, data)[kind]()


def test_forward_hooks_are_part_of_the_model():
    """NOTE [module hooks]: forward (pre-)hooks run in every pass, as in the references."""
    model, loss_func, params, data = _problem()
    model[0].register_forward_hook(lambda module, inputs, output: 2 * output)
    model[2].register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,))
    G = GGNLinearOperator(model, loss_func, params, data)
    H = HessianLinearOperator(model, loss_func, params, data)
    torch.testing.assert_close(G.to_dense(), dense_ggn(model, loss_func, params, data))
    torch.testing.assert_close(H.to_dense(), dense_hessian(model, loss_func, params, data))
