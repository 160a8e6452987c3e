"""KFAC against dense ground truths in the settings where it is exact (float64)."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import (
    DTYPE,
    MeanOverPositions,
    batches,
    block_diagonal,
    build,
    generator,
    module_groups,
)
from torch import nn

from curvops.kronecker import KFACLinearOperator
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ef, dense_ggn

N, T = 12, 3


def deep_linear(bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 3, bias=bias), nn.Linear(3, 3, bias=bias), nn.Linear(3, 2, bias=bias)
    )


def shuffled(params: list, seed: int = 0) -> list:
    order = torch.randperm(len(params), generator=generator(seed)).tolist()
    return [params[i] for i in order]


def sequence_data(out_dim: int = 2, seed: int = 1):
    g = generator(seed)
    X = torch.randn(N, T, 4, generator=g, dtype=DTYPE)
    y = torch.randn(N, T, out_dim, generator=g, dtype=DTYPE)
    return batches(X, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_type2_expand_exact_for_deep_linear_sequence_mse(bias, separate, reduction):
    """Position-wise deep linear net, one MSE term per position: KFAC-expand is exact."""
    model = build(lambda: deep_linear(bias))
    params = shuffled(list(model.parameters()))
    data = sequence_data()
    loss = nn.MSELoss(reduction=reduction)
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=separate
    )
    G = dense_ggn(model, loss, params, data)
    expected = block_diagonal(G, params, module_groups(model, params, separate))
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_type2_reduce_exact_for_positions_aggregated_before_loss(bias, separate, reduction):
    """Shared linear layers, positions averaged before the loss: KFAC-reduce is exact."""
    model = build(
        lambda: nn.Sequential(
            nn.Linear(4, 3, bias=bias),
            nn.Linear(3, 3, bias=bias),
            MeanOverPositions(),
            nn.Linear(3, 2, bias=bias),
        )
    )
    params = shuffled(list(model.parameters()), seed=3)
    g = generator(2)
    X = torch.randn(N, T, 4, generator=g, dtype=DTYPE)
    data = batches(X, torch.randn(N, 2, generator=g, dtype=DTYPE))
    loss = nn.MSELoss(reduction=reduction)
    K = KFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type="type-2",
        kfac_approx="reduce",
        separate_weight_and_bias=separate,
    )
    G = dense_ggn(model, loss, params, data)
    expected = block_diagonal(G, params, module_groups(model, params, separate))
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)


def test_expand_is_not_exact_where_reduce_is():
    """Guard against a test that cannot fail: expand differs from the GGN in reduce's setting."""
    model = build(lambda: nn.Sequential(nn.Linear(4, 3), MeanOverPositions(), nn.Linear(3, 2)))
    params = list(model.parameters())
    g = generator(2)
    data = batches(
        torch.randn(N, T, 4, generator=g, dtype=DTYPE), torch.randn(N, 2, generator=g, dtype=DTYPE)
    )
    loss = nn.MSELoss()
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, True)
    )
    assert (K.to_dense() - expected).norm() > 1e-3 * expected.norm()


def one_datum(loss_name: str):
    g = generator(5)
    X = torch.randn(1, 4, generator=g, dtype=DTYPE)
    if loss_name == "CrossEntropyLoss":
        return nn.CrossEntropyLoss(), [(X, torch.tensor([2]))]
    if loss_name == "BCEWithLogitsLoss":
        return nn.BCEWithLogitsLoss(), [(X, torch.rand(1, 3, generator=g, dtype=DTYPE).round())]
    return nn.MSELoss(), [(X, torch.randn(1, 3, generator=g, dtype=DTYPE))]


def tanh_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("loss_name", ["CrossEntropyLoss", "BCEWithLogitsLoss", "MSELoss"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_single_datum_exact(loss_name, fisher_type):
    """With one datum, A and B are rank-one/exact: type-2 = GGN blocks, empirical = EF blocks."""
    model = build(tanh_net)
    params = list(model.parameters())
    loss, data = one_datum(loss_name)
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type=fisher_type, separate_weight_and_bias=False
    )
    dense = dense_ggn if fisher_type == "type-2" else dense_ef
    expected = block_diagonal(
        dense(model, loss, params, data), params, module_groups(model, params, False)
    )
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)


def test_mc_matches_type2_in_expectation():
    """MC KFAC on one datum is an average of S i.i.d. rank-one terms with mean = type-2 KFAC.

    For cross-entropy the would-be gradient at the output is p - e_c with probability p_c, so
    the MC gradient factor of the last layer is B_S = (1/S) sum_s u_s u_s^T with
    E[u u^T] = B (type-2) and E||B_S - B||_F^2 = (E||u||^4 - ||B||_F^2) / S, computed exactly by
    enumerating the classes. We allow 5 standard deviations (Chebyshev: failure prob. <= 4%,
    and the seed is fixed).
    """
    model = build(tanh_net)
    params = list(model.parameters())
    loss, data = one_datum("CrossEntropyLoss")
    S = 2000
    K_mc = KFACLinearOperator(model, loss, params, data, fisher_type="mc", mc_samples=S, seed=7)
    K_2 = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    B_mc, B_2 = K_mc.factors["2"].gradient_factor, K_2.factors["2"].gradient_factor
    with torch.no_grad():
        p = model(data[0][0]).softmax(dim=1)[0]
    u = p.unsqueeze(0) - torch.eye(3, dtype=DTYPE)  # row c: gradient for label c
    fourth = (p * u.square().sum(dim=1).square()).sum()
    std = ((fourth - B_2.square().sum()) / S).sqrt()
    assert 0 < (B_mc - B_2).norm() <= 5 * std
    # the input factors do not depend on the labels
    torch.testing.assert_close(K_mc.factors["0"].input_factor, K_2.factors["0"].input_factor)


def test_mc_is_reproducible_and_seed_dependent():
    model = build(tanh_net)
    params = list(model.parameters())
    g = generator(9)
    data = batches(
        torch.randn(N, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (N,), generator=g)
    )
    loss = nn.CrossEntropyLoss()
    first = KFACLinearOperator(model, loss, params, data, seed=1).to_dense()
    again = KFACLinearOperator(model, loss, params, data, seed=1).to_dense()
    other = KFACLinearOperator(model, loss, params, data, seed=2).to_dense()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).norm() > 1e-6 * first.norm()


def test_forward_only_is_type2_input_factor_with_identity_gradient_factor():
    """NOTE [forward-only scaling]: A as for type-2, B = I."""
    model = build(lambda: nn.Sequential(nn.Linear(4, 3)))
    params = list(model.parameters())
    g = generator(4)
    data = batches(
        torch.randn(N, T, 4, generator=g, dtype=DTYPE),
        torch.randn(N, T, 3, generator=g, dtype=DTYPE),
    )
    loss = nn.MSELoss()
    K_fo = KFACLinearOperator(model, loss, params, data, fisher_type="forward-only")
    K_2 = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    f_fo, f_2 = K_fo.factors["0"], K_2.factors["0"]
    torch.testing.assert_close(f_fo.input_factor, f_2.input_factor)
    torch.testing.assert_close(f_fo.gradient_factor, torch.eye(3, dtype=DTYPE))
    X = torch.cat([x for x, _ in data]).reshape(-1, 4)
    torch.testing.assert_close(f_fo.input_factor, X.T @ X / X.shape[0])
    expected = torch.block_diag(
        torch.kron(torch.eye(3, dtype=DTYPE), f_2.input_factor), torch.eye(3, dtype=DTYPE)
    )
    assert_operator_matches(K_fo, expected)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_wide_layers_factors_are_the_explicit_sums(separate):
    """Factors wider than a Gram panel (NOTE [upper-triangular Gram sums]) are complete.

    Two linear layers of widths 2 * PANEL + 3 (input) and 3 * PANEL + 1 (output): A is the
    mean of x x^T (x with a 1 appended for a joint bias), B the sum of the backpropagated
    per-datum gradient outer products (here with the ReLU mask from the forward pass).
    """
    from curvops.kronecker.gram import PANEL

    d_in, d_hidden = 2 * PANEL + 3, 3 * PANEL + 1
    model = build(
        lambda: nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, 2))
    )
    params = list(model.parameters())
    g = generator(8)
    X = torch.randn(N, d_in, generator=g, dtype=DTYPE)
    data = batches(X, torch.randn(N, 2, generator=g, dtype=DTYPE))
    K = KFACLinearOperator(
        model,
        nn.MSELoss(reduction="sum"),
        params,
        data,
        fisher_type="type-2",
        separate_weight_and_bias=separate,
    )
    f = K.factors["0"]
    x = torch.cat([X, torch.ones(N, 1, dtype=DTYPE)], dim=1) if not separate else X
    torch.testing.assert_close(f.input_factor, x.T @ x / N)
    # per-datum output gradients of layer 0 for the type-2 factor sqrt(2) I of the sum-MSE
    W2 = model[2].weight.detach()
    mask = (model[0](X) > 0).to(DTYPE).detach()
    J = mask[:, None, :] * W2[None]  # [N, 2, d_hidden]: d f / d z_0
    B = 2.0 * torch.einsum("nki,nkj->ij", J, J)
    torch.testing.assert_close(f.gradient_factor, B)
    hidden = torch.relu(model[0](X)).detach()
    torch.testing.assert_close(K.factors["2"].gradient_factor, 2.0 * N * torch.eye(2, dtype=DTYPE))
    h = torch.cat([hidden, torch.ones(N, 1, dtype=DTYPE)], dim=1) if not separate else hidden
    torch.testing.assert_close(K.factors["2"].input_factor, h.T @ h / N)


def test_embedding_expand_exact_with_padding():
    """Embedding + position-wise linear head with MSE per position: exact, A = token counts."""
    model = build(lambda: nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Linear(3, 2)))
    params = list(model.parameters())
    g = generator(6)
    ids = torch.randint(0, 6, (N, T), generator=g)
    data = batches(ids, torch.randn(N, T, 2, generator=g, dtype=DTYPE))
    loss = nn.MSELoss()
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, True)
    )
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)
    counts = torch.bincount(ids.reshape(-1), minlength=6).to(DTYPE)
    counts[0] = 0
    torch.testing.assert_close(K.factors["0"].input_factor, counts / (N * T))


def test_num_per_example_loss_terms_rescales_expand_input_factor():
    """A = sum x x^T / (N T0) with T0 given instead of each layer's T positions."""
    model = build(lambda: nn.Sequential(nn.Linear(4, 2)))
    params = list(model.parameters())
    data = sequence_data()
    loss = nn.MSELoss()
    default = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    fixed = KFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", num_per_example_loss_terms=1
    )
    torch.testing.assert_close(
        fixed.factors["0"].input_factor, T * default.factors["0"].input_factor
    )
    torch.testing.assert_close(
        fixed.factors["0"].bias_input_factor, torch.tensor(float(T), dtype=DTYPE)
    )


def test_dict_params_and_batch_size_fn():
    """Dict params and mapping inputs flow through the same data loop."""

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, X):
            return self.lin(X["x"])

    model = build(DictNet)
    g = generator(8)
    X = torch.randn(N, 4, generator=g, dtype=DTYPE)
    y = torch.randn(N, 2, generator=g, dtype=DTYPE)
    data = [({"x": xb}, yb) for xb, yb in batches(X, y)]
    params = dict(model.named_parameters())
    K = KFACLinearOperator(
        model,
        nn.MSELoss(),
        params,
        data,
        fisher_type="type-2",
        batch_size_fn=lambda X: X["x"].shape[0],
    )
    plain = nn.Sequential(model.lin)
    reference = KFACLinearOperator(
        plain, nn.MSELoss(), list(plain.parameters()), batches(X, y), fisher_type="type-2"
    )
    torch.testing.assert_close(K.to_dense(), reference.to_dense())


def test_progressbar_runs():
    model = build(lambda: nn.Sequential(nn.Linear(4, 2)))
    K = KFACLinearOperator(
        model,
        nn.MSELoss(),
        list(model.parameters()),
        sequence_data(),
        fisher_type="type-2",
        progressbar=True,
        check_deterministic=False,
    )
    assert K.trace() > 0
