"""Data format, dtypes and integer options: errors name the problem and the fix."""

import pytest
import torch
from helpers.operator_zoo import DTYPE, OPERATOR_KINDS, build_operator, classification_batches, mlp
from torch import nn

from curvops import FisherMCLinearOperator, GGNLinearOperator


def _problem():
    model, data = mlp(), classification_batches()
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_data_given_as_one_pair(kind):
    model, loss, params, data = _problem()
    X, y = data[0]
    for pair in [(X, y), [X, y]]:
        with pytest.raises(ValueError, match=r"data is one pair \(X, y\).*data=\[\(X, y\)\]"):
            build_operator(kind, model, loss, params, pair)


def test_batch_that_is_a_tensor_suggests_a_list_of_pairs():
    model, loss, params, data = _problem()
    X, _ = data[0]
    with pytest.raises(ValueError, match=r"got Tensor\. If you passed data=\(X, y\), pass"):
        GGNLinearOperator(model, loss, params, [X])


@pytest.mark.parametrize("num_data", [False, True], ids=["counted", "given"])
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_float32_model_with_float64_data(kind, num_data):
    model, loss, _, data = _problem()
    model.float()
    options = {"num_data": 7} if num_data else {}
    match = (
        r"The data X has dtype torch.float64, but the parameters are torch.float32: convert the "
        r"data with X.float\(\) or the model with model.double\(\)"
    )
    with pytest.raises(TypeError, match=match):
        build_operator(kind, model, loss, list(model.parameters()), data, **options)


def test_mismatched_targets_mapping_inputs_and_loss_weights():
    model, _, params, data = _problem()
    regression = [(X, torch.randn(X.shape[0], 2)) for X, _ in data]  # float32 targets
    with pytest.raises(TypeError, match=r"targets y have dtype torch.float32.*y.double\(\)"):
        GGNLinearOperator(model, nn.MSELoss(), params, regression)

    class DictInput(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, X):
            return self.net(X["x"])

    wrapped = DictInput(model)
    dict_data = [({"x": X.float()}, y) for X, y in data]
    with pytest.raises(TypeError, match=r"data X\['x'\] has dtype torch.float32.*X\['x'\].double"):
        GGNLinearOperator(
            wrapped,
            nn.CrossEntropyLoss(),
            list(wrapped.parameters()),
            dict_data,
            batch_size_fn=lambda X: X["x"].shape[0],
        )

    weighted = nn.CrossEntropyLoss(weight=torch.ones(2))  # float32 class weights
    with pytest.raises(TypeError, match=r"CrossEntropyLoss's weight has dtype torch.float32.*"):
        GGNLinearOperator(model, weighted, params, data)
    weighted.to(DTYPE)
    GGNLinearOperator(model, weighted, params, data)  # fixed as the message says


def test_integer_data_is_not_compared():
    embedding = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(DTYPE)
    tokens = torch.randint(0, 5, (4, 2))
    data = [(tokens, torch.randint(0, 2, (4,)))]
    GGNLinearOperator(embedding, nn.CrossEntropyLoss(), list(embedding.parameters()), data)


@pytest.mark.parametrize(
    "num_data, error, match",
    [
        (-8, ValueError, "num_data must be an integer >= 1, got -8"),
        (0, ValueError, "num_data must be an integer >= 1, got 0"),
        (7.0, TypeError, "num_data must be an integer, got float"),
        (True, TypeError, "num_data must be an integer, got bool"),
    ],
)
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_bad_num_data(kind, num_data, error, match):
    model, loss, params, data = _problem()
    with pytest.raises(error, match=match):
        build_operator(kind, model, loss, params, data, num_data=num_data)


def test_bad_batch_size_fn_and_mc_options():
    model, loss, params, data = _problem()
    with pytest.raises(ValueError, match=r"batch_size_fn\(X\) must be an integer >= 0, got -1"):
        GGNLinearOperator(model, loss, params, data, batch_size_fn=lambda X: -1)
    with pytest.raises(TypeError, match="mc_samples must be an integer, got bool"):
        FisherMCLinearOperator(model, loss, params, data, mc_samples=True)
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1, got 0"):
        FisherMCLinearOperator(model, loss, params, data, mc_samples=0)
    with pytest.raises(TypeError, match="seed must be an integer, got float 1.5"):
        FisherMCLinearOperator(model, loss, params, data, seed=1.5)
