"""Safeguards: bad inputs give clear errors, products never touch the caller's state."""

import pytest
import torch
from cases import make_case
from helpers.operator_zoo import build_operator, classification_batches, random_vector
from helpers.operator_zoo import mlp as tiny_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    NonDeterministicError,
)

OPERATORS = [HessianLinearOperator, GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator]


@pytest.fixture
def mlp():
    case = make_case("mlp-ce-mean")
    return case.model_func, case.loss_func, case.params, case.data


@pytest.mark.parametrize("cls", OPERATORS)
def test_bad_vectors(cls, mlp):
    A = cls(*mlp)
    D = A.shape[1]
    with pytest.raises(ValueError, match=rf"flat vector of shape \[{D}\]"):
        A @ torch.zeros(D + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="flat vector of shape"):
        A @ torch.zeros(D, 2, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        A @ torch.zeros(D, dtype=torch.float32)
    with pytest.raises(ValueError, match="device meta"):
        A @ torch.zeros(D, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="entries"):
        A @ [torch.zeros_like(p) for p in mlp[2][:-1]]
    with pytest.raises(ValueError, match="NaN or Inf"):
        A @ torch.full((D,), float("nan"), dtype=torch.float64)


def test_reduction_none(mlp):
    model, _, params, data = mlp
    with pytest.raises(ValueError, match="reduction='none'"):
        GGNLinearOperator(model, nn.CrossEntropyLoss(reduction="none"), params, data)


@pytest.mark.parametrize("cls", [EFLinearOperator, FisherMCLinearOperator])
def test_unsupported_loss_for_fishers(cls):
    case = make_case("custom-quartic-mean")
    with pytest.raises(NotImplementedError, match="MSELoss, CrossEntropyLoss, BCEWithLogitsLoss"):
        cls(case.model_func, case.loss_func, case.params, case.data)


def test_unsupported_loss_options(mlp):
    model, _, params, data = mlp
    weighted = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="class weights"):
        FisherMCLinearOperator(model, weighted, params, data)
    with pytest.raises(NotImplementedError, match="class weights"):
        EFLinearOperator(model, weighted, params, data)
    # label smoothing has a likelihood reading (the model's categorical is unchanged)
    EFLinearOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), params, data)


def test_bad_params(mlp):
    model, loss, params, data = mlp
    with pytest.raises(ValueError, match="not a parameter of the model"):
        GGNLinearOperator(model, loss, [p.detach().clone().requires_grad_() for p in params], data)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        GGNLinearOperator(model, loss, [2 * params[0]], data)
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        GGNLinearOperator(frozen, loss, [frozen.weight], data)
    with pytest.raises(ValueError, match="more than once"):
        GGNLinearOperator(model, loss, [params[0], params[0]], data)
    with pytest.raises(ValueError, match="params is empty"):
        GGNLinearOperator(model, loss, [], data)


def test_bad_data(mlp):
    model, loss, params, data = mlp
    with pytest.raises(ValueError, match="empty"):
        GGNLinearOperator(model, loss, params, [])
    with pytest.raises(TypeError, match="one-shot iterator"):
        GGNLinearOperator(model, loss, params, iter(data))
    with pytest.raises(ValueError, match=r"pair \(X, y\)"):
        GGNLinearOperator(model, loss, params, [data[0][0]])
    dict_case = make_case("dict-input-mse-mean")
    with pytest.raises(ValueError, match="batch_size_fn"):
        GGNLinearOperator(
            dict_case.model_func, dict_case.loss_func, dict_case.params, dict_case.data
        )
    with pytest.raises(ValueError, match="num_data"):
        GGNLinearOperator(model, loss, params, data, num_data=5) @ torch.zeros(
            sum(p.numel() for p in params), dtype=torch.float64
        )


def test_non_finite_product():
    case = make_case("mlp-mse-sum")
    X, y = case.data[0]
    bad = [(X.clone().fill_(float("inf")), y)]
    H = HessianLinearOperator(
        case.model_func, case.loss_func, case.params, bad, check_deterministic=False
    )
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        H @ torch.ones(H.shape[1], dtype=torch.float64)


def test_dropout_in_train_mode_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()
    data = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))]
    for cls in OPERATORS:
        with pytest.raises(NonDeterministicError, match="dropout"):
            cls(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    model.eval()
    GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)


def test_shuffling_loader_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ds = TensorDataset(torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,)))
    loader = DataLoader(ds, batch_size=6, shuffle=True, drop_last=True)
    with pytest.raises(NonDeterministicError, match="shuffle=True"):
        GGNLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            list(model.parameters()),
            loader,
            num_data=18,
        )


def test_dataloader_and_progressbar(capsys):
    case = make_case("mlp-ce-mean")
    X = torch.cat([X for X, _ in case.data])
    y = torch.cat([y for _, y in case.data])
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    A = GGNLinearOperator(case.model_func, case.loss_func, case.params, loader, progressbar=True)
    B = GGNLinearOperator(case.model_func, case.loss_func, case.params, case.data)
    v = torch.randn(A.shape[1], dtype=torch.float64)
    torch.testing.assert_close(A @ v, B @ v)
    assert "GGNLinearOperator" in capsys.readouterr().err


@pytest.mark.parametrize("cls", OPERATORS)
def test_caller_state_untouched(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    params = list(model.parameters())
    model[2].bias.requires_grad_(False)
    ds = TensorDataset(torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
    loader = DataLoader(ds, batch_size=4, shuffle=True)  # iterating draws from the global RNG
    rng_before = torch.get_rng_state()
    A = cls(model, nn.CrossEntropyLoss(), params[:3], loader, check_deterministic=False)
    _ = A @ torch.ones(A.shape[1], dtype=torch.float64)
    _ = A.gradient_and_loss()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef", "mc-fisher", "jacobian"])
def test_exact_operators_follow_in_place_parameter_changes(kind):
    """Exact operators read the live parameters: after an optimiser step, the new matrix."""
    model, data = tiny_mlp(), classification_batches()
    params, loss = list(model.parameters()), nn.CrossEntropyLoss()
    A = build_operator(kind, model, loss, params, data)
    v = random_vector(A)
    before = A @ v
    X, y = data[0]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss(model(X), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fresh = build_operator(kind, model, loss, params, data)
    torch.testing.assert_close(A @ v, fresh @ v, rtol=1e-12, atol=1e-14)
    assert (A @ v - before).abs().max() > 1e-3
