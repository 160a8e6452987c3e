"""EKFAC: exact where KFAC is exact, optimal in its eigenbasis, no worse than KFAC."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import (
    DTYPE,
    batches,
    block_diagonal,
    build,
    generator,
    module_groups,
)
from torch import nn

from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ef, dense_ggn

N, T = 12, 3


def ekfac_dense(EK: EKFACLinearOperator) -> torch.Tensor:
    """Dense EKFAC assembled with torch.kron from its bases and corrections (param order)."""
    D = EK.shape[0]
    sizes = [s.numel() for s in map(torch.Size, EK.in_shapes)]
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    dense = torch.zeros(D, D, dtype=DTYPE)
    index = {name: i for i, name in enumerate(EK.param_names)}
    for name, f in EK.factors.items():
        lam = EK.eigenvalue_corrections[name]
        QB = EK.eigendecomposition(name, "gradient")[1]
        if "weight" in lam:
            if f.diagonal_input:
                Q = torch.kron(torch.eye(lam["weight"].shape[0], dtype=DTYPE), QB)
            else:
                Q = torch.kron(QB, EK.eigendecomposition(name, "input")[1])
            block = (Q * lam["weight"].reshape(-1)) @ Q.T
            idx = torch.arange(offsets[index[f.weight_name]], offsets[index[f.weight_name] + 1])
            if f.joint:
                # the block acts on [W | b] row-major; map to the flat [vec W, b] layout
                d_out, n = lam["weight"].shape
                grid = torch.arange(d_out * n).reshape(d_out, n)
                perm = torch.cat([grid[:, :-1].reshape(-1), grid[:, -1]])
                block = block[perm][:, perm]
                b = index[f.bias_name]
                idx = torch.cat([idx, torch.arange(offsets[b], offsets[b + 1])])
            dense[idx[:, None], idx[None, :]] = block
        if "bias" in lam:
            block = (QB * lam["bias"]) @ QB.T
            b = index[f.bias_name]
            idx = torch.arange(offsets[b], offsets[b + 1])
            dense[idx[:, None], idx[None, :]] = block
    return dense


def sequence_problem(bias: bool = True):
    model = build(lambda: nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Linear(3, 2, bias=bias)))
    g = generator(1)
    data = batches(
        torch.randn(N, T, 4, generator=g, dtype=DTYPE),
        torch.randn(N, T, 2, generator=g, dtype=DTYPE),
    )
    return model, list(model.parameters()), data


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_ekfac_exact_where_kfac_is_exact(bias, separate):
    model, params, data = sequence_problem(bias)
    params = params[::-1]
    loss = nn.MSELoss()
    EK = EKFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=separate
    )
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, separate)
    )
    assert_operator_matches(EK, expected, rtol=1e-8, atol=1e-11)
    assert_operator_matches(EK, ekfac_dense(EK), rtol=1e-8, atol=1e-11)


def test_ekfac_exact_for_embedding_sequence():
    model = build(lambda: nn.Sequential(nn.Embedding(5, 3, padding_idx=1), nn.Linear(3, 2)))
    params = list(model.parameters())
    g = generator(2)
    ids = torch.randint(0, 5, (N, T), generator=g)
    data = batches(ids, torch.randn(N, T, 2, generator=g, dtype=DTYPE))
    loss = nn.MSELoss(reduction="sum")
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, True)
    )
    assert_operator_matches(EK, expected, rtol=1e-8, atol=1e-11)
    assert_operator_matches(EK, ekfac_dense(EK), rtol=1e-8, atol=1e-11)


def classification_problem(conv: bool):
    if conv:
        model = build(
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
            )
        )
        X = torch.randn(N, 2, 3, 3, generator=generator(3), dtype=DTYPE)
    else:
        model = build(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
        X = torch.randn(N, 4, generator=generator(3), dtype=DTYPE)
    y = torch.randint(0, 3, (N,), generator=generator(4))
    return model, list(model.parameters()), batches(X, y)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
def test_ekfac_is_the_exact_diagonal_in_the_kfac_eigenbasis(conv, separate, kfac_approx):
    """George et al. (2018): the corrected eigenvalues are diag(Q^T G Q), hence EKFAC is the
    Frobenius-closest matrix with KFAC's eigenbasis, and at least as close as KFAC."""
    model, params, data = classification_problem(conv)
    loss = nn.CrossEntropyLoss()
    options = {
        "fisher_type": "type-2",
        "separate_weight_and_bias": separate,
        "kfac_approx": kfac_approx,
    }
    K = KFACLinearOperator(model, loss, params, data, **options)
    EK = EKFACLinearOperator(model, loss, params, data, **options)
    G = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, separate)
    )
    K_dense, EK_dense = K.to_dense(), ekfac_dense(EK)
    assert_operator_matches(EK, EK_dense, rtol=1e-8, atol=1e-11)
    # same eigenbasis: EKFAC and KFAC commute, and EKFAC's eigenvalues are G's diagonal there
    torch.testing.assert_close(K_dense @ EK_dense, EK_dense @ K_dense)
    eigvals, Q = torch.linalg.eigh(EK_dense)
    torch.testing.assert_close(((Q.T @ G @ Q).diagonal()), eigvals, rtol=1e-7, atol=1e-10)
    assert (EK_dense - G).norm() <= (K_dense - G).norm() * (1 + 1e-10)
    assert (EK_dense - G).norm() < 0.99 * (K_dense - G).norm()  # strictly better here


def test_ekfac_sums_positions_before_squaring():
    """Empirical Fisher on sequences: the correction uses per-datum gradients (summed over the
    positions of a datum), so its eigenvalues are the EF's exact diagonal in the basis."""
    model, params, data = sequence_problem()
    model = nn.Sequential(model[0], nn.Tanh(), model[1])
    loss = nn.MSELoss()
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="empirical")
    E = block_diagonal(
        dense_ef(model, loss, params, data), params, module_groups(model, params, True)
    )
    dense = ekfac_dense(EK)
    eigvals, Q = torch.linalg.eigh(dense)
    torch.testing.assert_close((Q.T @ E @ Q).diagonal(), eigvals, rtol=1e-7, atol=1e-10)


def test_mc_ekfac_reuses_the_samples_of_the_factor_pass():
    """One datum: MC KFAC is exact for its own sampled labels; EKFAC's second pass must draw the
    same labels (NOTE [MC seeding across ranks]) and then equals KFAC."""
    model, params, data = classification_problem(conv=False)
    data = [(data[0][0][:1], data[0][1][:1])]
    loss = nn.CrossEntropyLoss()
    options = {"fisher_type": "mc", "mc_samples": 3, "seed": 11}
    K = KFACLinearOperator(model, loss, params, data, **options)
    EK = EKFACLinearOperator(model, loss, params, data, **options)
    torch.testing.assert_close(EK.to_dense(), K.to_dense(), rtol=1e-8, atol=1e-11)


def test_ekfac_closed_forms_match_dense():
    model, params, data = classification_problem(conv=False)
    EK = EKFACLinearOperator(model, nn.MSELoss(), params, _regression(data), fisher_type="type-2")
    dense = EK.to_dense()
    torch.testing.assert_close(EK.trace(), dense.trace())
    torch.testing.assert_close(EK.frobenius_norm(), torch.linalg.matrix_norm(dense))
    sign, logabsdet = torch.linalg.slogdet(dense)
    assert sign == 1
    torch.testing.assert_close(EK.logdet(), logabsdet)
    torch.testing.assert_close(EK.det(), torch.linalg.det(dense))


def _regression(data):
    g = generator(12)
    return [(X, torch.randn(X.shape[0], 3, generator=g, dtype=DTYPE)) for X, _ in data]


def test_ekfac_state_dict_roundtrip():
    model, params, data = classification_problem(conv=False)
    loss = nn.CrossEntropyLoss()
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="empirical")
    state = EK.state_dict()
    fresh = EKFACLinearOperator(model, loss, params, data, fisher_type="empirical")
    fresh.load_state_dict(state)
    assert fresh._factors is not None and fresh._corrections is not None
    torch.testing.assert_close(fresh.to_dense(), EK.to_dense())
    state["eigenvalue_corrections"]["0"]["weight"] = torch.zeros(2, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="eigenvalue_corrections have shapes"):
        fresh.load_state_dict(state)


def test_ekfac_refuses_forward_only():
    model, params, data = classification_problem(conv=False)
    with pytest.raises(ValueError, match="fisher_type='forward-only' computes none"):
        EKFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, fisher_type="forward-only")


class PositionMixingSequenceClassifier(nn.Module):
    """Per-position classes [N, C, T] from hidden states that mix positions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + h.mean(dim=1, keepdim=True)
        return self.b(h).transpose(1, 2)


def test_type2_ekfac_is_exact_diagonal_for_sequence_cross_entropy():
    """Type-2 factors of cross-entropy combine positions in one column; the correction splits
    them per position, so no cross-position terms enter the GGN diagonal."""
    model = build(PositionMixingSequenceClassifier)
    params = list(model.parameters())
    g = generator(0)
    X = torch.randn(N, T, 4, generator=g, dtype=DTYPE)
    data = batches(X, torch.randint(0, 3, (N, T), generator=g))
    loss = nn.CrossEntropyLoss()
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    G = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, True)
    )
    eigvals, Q = torch.linalg.eigh(ekfac_dense(EK))
    torch.testing.assert_close((Q.T @ G @ Q).diagonal(), eigvals, rtol=1e-7, atol=1e-10)
