"""laplace-torch with curvops' backends against dense float64 references (digits data).

Each fit is checked through laplace-torch's own API (``fit``, ``log_marginal_likelihood``,
``optimize_prior_precision``, the GLM predictive) against closed forms built from dense
``torch.func`` curvature matrices of the whole data set, in laplace's scaling (NOTE
[laplace-torch scaling] of :mod:`curvops.integrations.laplace`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from functools import cache

import pytest
import torch
from torch import nn

if importlib.util.find_spec("laplace") is None:
    if os.environ.get("CI"):
        pytest.fail(
            "CI must install laplace-torch (Makefile: LAPLACE_NO_DEPS and LAPLACE_DEPS).",
            pytrace=False,
        )
    pytest.skip("laplace-torch (the `laplace` extra) is not installed", allow_module_level=True)

from laplace import Laplace  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from curvops.integrations.laplace import CurvopsEF, CurvopsGGN, CurvopsHessian  # noqa: E402
from curvops.kronecker import KFACLinearOperator  # noqa: E402
from curvops.testing import dense_ef, dense_ggn, dense_hessian, dense_jacobian  # noqa: E402

DTYPE = torch.float64
N, N_TEST, BATCH = 96, 12, 40  # batches of 40, 40 and 16
DELTA = 0.7  # prior precision for the fixed-prior checks
FACTOR = {"classification": 1.0, "regression": 0.5}


@cache
def problem(likelihood: str):
    """A small MLP trained briefly on scikit-learn's digits; train and test tensors."""
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    X = torch.tensor(X[: N + N_TEST] / 16.0, dtype=DTYPE)
    labels = torch.tensor(labels[: N + N_TEST])
    if likelihood == "classification":
        y, out = labels, 10
    else:  # two targets: the digit (scaled) and the mean ink
        y, out = torch.stack([labels.to(DTYPE) / 9 - 0.5, X.mean(dim=1)], dim=1), 2
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, out)).to(DTYPE)
    loss = nn.CrossEntropyLoss() if likelihood == "classification" else nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        loss(model(X[:N]), y[:N]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, X[:N], y[:N], X[N:]


def loader(likelihood: str) -> DataLoader:
    _, X, y, _ = problem(likelihood)
    return DataLoader(TensorDataset(X, y), batch_size=BATCH)


def laplace_params(model: nn.Module, subset: str) -> list[torch.Tensor]:
    return list((model[-1] if subset == "last_layer" else model).parameters())


@cache
def reference(likelihood: str, subset: str, kind: str, structure: str) -> torch.Tensor:
    """Dense curvature of the whole data set in laplace's scaling (``factor`` x sum loss)."""
    model, X, y, _ = problem(likelihood)
    params = laplace_params(model, subset)
    loss = (
        nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else (nn.MSELoss(reduction="sum"))
    )
    data = [(X, y)]
    if structure == "kron":
        fisher_type = {"ggn": "type-2", "ef": "empirical"}[kind]
        K = KFACLinearOperator(model, loss, params, data, fisher_type=fisher_type)
        H = K.to_dense()
    else:
        H = {"ggn": dense_ggn, "ef": dense_ef, "hessian": dense_hessian}[kind](
            model, loss, params, data
        )
    H = FACTOR[likelihood] * H
    return torch.diag(H.diagonal()) if structure == "diag" else H


def reference_loss(likelihood: str) -> torch.Tensor:
    model, X, y, _ = problem(likelihood)
    with torch.no_grad():
        if likelihood == "classification":
            return nn.functional.cross_entropy(model(X), y, reduction="sum")
        return 0.5 * nn.functional.mse_loss(model(X), y, reduction="sum")


def reference_lml(likelihood: str, H: torch.Tensor, theta: torch.Tensor, delta) -> torch.Tensor:
    r"""Laplace's log evidence of a Gaussian posterior with precision :math:`H + \delta I`."""
    D = theta.numel()
    log_lik = -reference_loss(likelihood)
    if likelihood == "regression":  # Gaussian with unit noise: the normaliser
        log_lik = log_lik - N * 2 * math.log(math.sqrt(2 * math.pi))
    logdet = torch.linalg.slogdet(H + delta * torch.eye(D, dtype=DTYPE))[1]
    return log_lik - 0.5 * (logdet - D * math.log(delta) + delta * theta @ theta)


def map_estimate(likelihood: str, subset: str) -> torch.Tensor:
    params = laplace_params(problem(likelihood)[0], subset)
    return torch.cat([p.detach().flatten() for p in params])


def laplace_matrix(la, structure: str) -> torch.Tensor:
    if structure == "full":
        return la.H
    if structure == "diag":
        return torch.diag(la.H)
    return la.H_facs.to_matrix()


def fit(likelihood, subset, structure, backend, **kwargs):
    model = problem(likelihood)[0]
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        prior_precision=DELTA,
        **kwargs,
    )
    la.fit(loader(likelihood))
    return la


def check_predictive(la, likelihood, subset, H):
    model, _, _, X_test = problem(likelihood)
    params = laplace_params(model, subset)
    J = dense_jacobian(model, params, [(X_test, None)])
    J = J.reshape(N_TEST, -1, J.shape[1])
    Sigma = torch.linalg.inv(H + DELTA * torch.eye(H.shape[0], dtype=DTYPE))
    f_var = J @ Sigma @ J.transpose(1, 2)
    with torch.no_grad():
        f_mu = model(X_test)
    if likelihood == "classification":
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        probs = la(X_test, pred_type="glm", link_approx="probit")
        torch.testing.assert_close(probs, torch.softmax(kappa * f_mu, dim=-1))
    else:
        mean, var = la(X_test, pred_type="glm")
        torch.testing.assert_close(mean, f_mu)
        torch.testing.assert_close(var, f_var)


BACKENDS = {"ggn": CurvopsGGN, "ef": CurvopsEF}


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_fit_evidence_and_predictive_match_dense_references(likelihood, kind, subset, structure):
    la = fit(likelihood, subset, structure, BACKENDS[kind])
    H = reference(likelihood, subset, kind, structure)
    torch.testing.assert_close(torch.as_tensor(la.loss), reference_loss(likelihood))
    torch.testing.assert_close(laplace_matrix(la, structure), H, rtol=1e-9, atol=1e-9)
    theta = map_estimate(likelihood, subset)
    torch.testing.assert_close(
        la.log_marginal_likelihood(torch.tensor(DELTA, dtype=DTYPE)),
        reference_lml(likelihood, H, theta, DELTA),
    )
    check_predictive(la, likelihood, subset, H)


@pytest.mark.filterwarnings("ignore:By default `link_approx` is `probit`")
@pytest.mark.parametrize(
    "likelihood, subset, structure",
    [
        ("classification", "all", "kron"),
        ("regression", "last_layer", "diag"),
        ("classification", "last_layer", "full"),
    ],
)
def test_optimized_prior_precision_maximises_the_reference_evidence(likelihood, subset, structure):
    la = fit(likelihood, subset, structure, CurvopsGGN)
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", prior_structure="scalar", n_steps=300
    )
    H = reference(likelihood, subset, "ggn", structure)
    theta = map_estimate(likelihood, subset)
    best = minimize_scalar(
        lambda log_delta: -reference_lml(likelihood, H, theta, math.exp(log_delta)).item(),
        bounds=(-8, 8),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert math.log(la.prior_precision.item()) == pytest.approx(best.x, abs=1e-3)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_subnetwork_matches_the_dense_submatrix(structure):
    model = problem("classification")[0]
    D = sum(p.numel() for p in model.parameters())
    indices = torch.randperm(D, generator=torch.Generator().manual_seed(3))[:40].sort().values
    la = fit(
        "classification",
        "subnetwork",
        structure,
        CurvopsGGN,
        subnetwork_indices=indices,
    )
    H = reference("classification", "all", "ggn", "full")[indices][:, indices]
    if structure == "diag":
        H = torch.diag(H.diagonal())
    torch.testing.assert_close(laplace_matrix(la, structure), H, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        theta = torch.nn.utils.parameters_to_vector(model.parameters())[indices]
    torch.testing.assert_close(
        la.log_marginal_likelihood(torch.tensor(DELTA, dtype=DTYPE)),
        reference_lml("classification", H, theta, DELTA),
    )


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_hessian_backend_matches_the_dense_hessian(structure):
    la = fit("regression", "last_layer", structure, CurvopsHessian)
    H = reference("regression", "last_layer", "hessian", structure)
    torch.testing.assert_close(laplace_matrix(la, structure), H, rtol=1e-9, atol=1e-9)


def test_hessian_backend_refuses_kron():
    with pytest.raises(ValueError, match="approximates the GGN or a Fisher, not the Hessian"):
        fit("classification", "last_layer", "kron", CurvopsHessian)


def test_stochastic_ggn_is_reproducible_and_near_the_ggn():
    kwargs = {"backend_kwargs": {"stochastic": True, "num_samples": 200}}
    la = fit("classification", "last_layer", "full", CurvopsGGN, **kwargs)
    again = fit("classification", "last_layer", "full", CurvopsGGN, **kwargs)
    torch.testing.assert_close(la.H, again.H, rtol=0, atol=0)
    G = reference("classification", "last_layer", "ggn", "full")
    assert torch.linalg.matrix_norm(la.H - G) < 0.1 * torch.linalg.matrix_norm(G)
    kwargs["backend_kwargs"]["seed"] = 1
    other = fit("classification", "last_layer", "full", CurvopsGGN, **kwargs)
    assert not torch.equal(other.H, la.H)


def test_backends_leave_the_caller_state_alone():
    model, X, y, _ = problem("classification")
    rng, training = torch.random.get_rng_state(), model.training
    backends = [CurvopsGGN(model, "classification", stochastic=True)]
    backends.append(CurvopsEF(model, "classification"))
    for backend in backends:
        backend.kron(X, y, N=N)
        backend.full(X, y)
        backend.diag(X, y)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks  # NOTE [one forward pass per batch]: the hook is removed
    assert model.training == training and all(p.requires_grad for p in model.parameters())


def test_stochastic_kron_approaches_the_kfac_of_the_ggn():
    la = fit(
        "classification",
        "all",
        "kron",
        CurvopsGGN,
        backend_kwargs={"stochastic": True, "num_samples": 100},
    )
    K = reference("classification", "all", "ggn", "kron")
    assert torch.linalg.matrix_norm(la.H_facs.to_matrix() - K) < 0.1 * torch.linalg.matrix_norm(K)


class _BrokenModule(type(math)):
    """A module whose attributes fail like laplace-torch beside a mismatched torchvision."""

    def __getattr__(self, name):
        raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize(
    "module, match",
    [
        (None, r'needs laplace-torch, whose import failed.*pip install "curvops\[laplace\]"'),
        (_BrokenModule("laplace.curvature.curvature"), "not match torch.*uninstall torchvision"),
    ],
    ids=["missing", "torchvision-mismatch"],
)
def test_import_errors_say_how_to_fix(monkeypatch, module, match):
    from curvops.integrations import laplace as adapter

    monkeypatch.setitem(sys.modules, "laplace.curvature.curvature", module)
    with pytest.raises(ImportError, match=match):
        adapter._import_laplace()


class _DictInputs(nn.Module):
    """The classifier on mapping inputs (as a HuggingFace model takes a ``BatchEncoding``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["input_ids"])


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_mapping_inputs_give_the_same_fit(structure):
    net, X, y, _ = problem("classification")
    rows = [{"input_ids": x, "labels": t} for x, t in zip(X, y)]
    loader = DataLoader(rows, batch_size=BATCH)  # default collate: a dict of stacked tensors
    la = Laplace(
        _DictInputs(net),
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=CurvopsGGN,
        prior_precision=DELTA,
    )
    la.fit(loader)
    H = reference("classification", "all", "ggn", structure)
    torch.testing.assert_close(laplace_matrix(la, structure), H, rtol=1e-9, atol=1e-9)


class _MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_last_layer_with_reduced_features_uses_the_whole_model(structure):
    """With laplace's ``feature_reduction`` the last layer's features are not its inputs:
    the operators then run the whole model with the last layer's parameters."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), _MeanOverPositions())
        X = torch.randn(30, 6, 4)
        y = torch.randint(0, 3, (30,))
    net = net.to(DTYPE)
    X = X.to(DTYPE)
    la = Laplace(
        net,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=structure,
        backend=CurvopsGGN,
        feature_reduction="pick_last",
        last_layer_name="2",
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=12))
    loss = nn.CrossEntropyLoss(reduction="sum")
    params = list(net[2].parameters())
    if structure == "kron":
        expected = KFACLinearOperator(net, loss, params, [(X, y)], fisher_type="type-2").to_dense()
    else:
        expected = dense_ggn(net, loss, params, [(X, y)])
    torch.testing.assert_close(laplace_matrix(la, structure), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_loss_is_the_batch_loss(likelihood, subset):
    """The loss next to KFAC comes from KFAC's own forward pass (NOTE [one forward pass per
    batch]); it is laplace's loss of the batch."""
    model, X, y, _ = problem(likelihood)
    la = Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure="kron", backend=CurvopsEF
    )
    la.fit(loader(likelihood))  # sets up the last-layer feature extractor
    loss, _ = la.backend.kron(X[:BATCH], y[:BATCH], N=N)
    with torch.no_grad():
        f = model(X[:BATCH])
    expected = (
        nn.functional.cross_entropy(f, y[:BATCH], reduction="sum")
        if likelihood == "classification"
        else 0.5 * nn.functional.mse_loss(f, y[:BATCH], reduction="sum")
    )
    torch.testing.assert_close(loss, expected)
    assert not model._forward_hooks


def test_last_layer_operators_see_the_layer_without_laplaces_hook():
    """NOTE [last layer without laplace's hook]: same parameters, same outputs, no hooks;
    laplace's own hook stays on its layer."""
    from curvops.integrations.laplace import _without_hooks

    model, X, y, _ = problem("classification")
    la = Laplace(model, "classification", subset_of_weights="last_layer", backend=CurvopsEF)
    la.fit(loader("classification"))
    layer = la.model.last_layer
    hooks = dict(layer._forward_hooks)
    assert hooks  # laplace-torch's feature hook
    twin = _without_hooks(layer)
    assert twin is not layer and not twin._forward_hooks
    assert twin.weight is layer.weight and twin.bias is layer.bias
    assert twin.training == layer.training
    features = torch.randn(3, layer.in_features, dtype=DTYPE)
    torch.testing.assert_close(twin(features), layer(features))
    loss, diagonal = la.backend.diag(X[:BATCH], y[:BATCH])
    assert diagonal.shape == (sum(p.numel() for p in layer.parameters()),)
    assert dict(layer._forward_hooks) == hooks
    other = nn.Tanh()
    assert _without_hooks(other) is other
    assert _without_hooks(model[0]) is model[0]  # no hooks: the layer itself
