"""KFAC/EKFAC on shared weights: a layer applied several times, an embedding tied to the
output layer (GPT-2 layout), against dense GGNs where KFAC is exact and the MC limit."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, batches, block_diagonal, build, generator
from torch import Tensor, nn

from curvops.kronecker import (
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvops.kronecker.tied import TiedEmbeddingLinearLayer, nearest_kronecker_of_sum
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ggn

N, T = 9, 3


# ==================================================================== a layer applied per position
class PerPosition(nn.Module):
    """Deep linear net on ``[N, T, 4]``; ``calls=True`` applies ``lin`` once per position."""

    def __init__(self, calls: bool, bias: bool = True, classes: int = 2):
        super().__init__()
        self.calls = calls
        self.lin = nn.Linear(4, 3, bias=bias)
        self.head = nn.Linear(3, classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.calls:
            h = torch.stack([self.lin(x[:, t]) for t in range(x.shape[1])], dim=1)
        else:
            h = self.lin(x)
        return self.head(h)


def twins(**kwargs) -> tuple[nn.Module, nn.Module]:
    one = build(lambda: PerPosition(calls=False, **kwargs))
    per = build(lambda: PerPosition(calls=True, **kwargs))
    per.load_state_dict(one.state_dict())
    return one, per


def mse_data(seed: int = 1):
    g = generator(seed)
    X = torch.randn(N, T, 4, generator=g, dtype=DTYPE)
    return batches(X, torch.randn(N, T, 2, generator=g, dtype=DTYPE), sizes=(4, 5))


class ClassAxisSecond(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).transpose(1, 2)  # [N, C, T] for CrossEntropyLoss


def padded_ce_data(seed: int = 2):
    g = generator(seed)
    X = torch.randn(N, T, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (N, T), generator=g)
    y[0, 2] = y[3, 1:] = y[7, 0] = -100  # padding
    return batches(X, y, sizes=(4, 5))


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_calls_of_a_shared_weight_act_as_positions(fisher_type, kfac_approx, separate):
    """A Linear applied to each position separately (T calls) has the factors of the Linear
    applied once to all positions (NOTE [weight sharing]), also with padded targets."""
    one, per = twins(classes=3)
    one, per = ClassAxisSecond(one), ClassAxisSecond(per)
    options = {
        "fisher_type": fisher_type,
        "kfac_approx": kfac_approx,
        "separate_weight_and_bias": separate,
    }
    data, loss = padded_ce_data(), nn.CrossEntropyLoss()
    K_one = KFACLinearOperator(one, loss, list(one.parameters()), data, **options)
    K_per = KFACLinearOperator(per, loss, list(per.parameters()), data, **options)
    assert len(K_per._layers) == 2
    for name in ("inner.lin", "inner.head"):
        f_one, f_per = K_one.factors[name], K_per.factors[name]
        torch.testing.assert_close(f_per.input_factor, f_one.input_factor, rtol=1e-12, atol=0)
        torch.testing.assert_close(f_per.gradient_factor, f_one.gradient_factor, rtol=1e-12, atol=0)
    torch.testing.assert_close(K_per.to_dense(), K_one.to_dense(), rtol=1e-12, atol=1e-15)
    if fisher_type != "mc":  # EKFAC: per-datum gradients summed over the calls
        E_one = EKFACLinearOperator(one, loss, list(one.parameters()), data, **options)
        E_per = EKFACLinearOperator(per, loss, list(per.parameters()), data, **options)
        torch.testing.assert_close(E_per.to_dense(), E_one.to_dense(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_type2_expand_exact_for_a_layer_called_per_position(separate):
    """Deep linear net, one MSE term per position, ``lin`` called once per position: the
    calls are positions with their own loss terms, so KFAC-expand is the exact block."""
    _, model = twins()
    params = list(model.parameters())
    data, loss = mse_data(), nn.MSELoss()
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=separate
    )
    groups = [[0], [1], [2], [3]] if separate else [[0, 1], [2, 3]]
    expected = block_diagonal(dense_ggn(model, loss, params, data), params, groups)
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)


class SumOfCalls(nn.Module):
    """``head(lin(x_1) + lin(x_2))``: a shared layer whose calls are summed before the loss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lin(x[:, 0]) + self.lin(x[:, 1]))


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_type2_reduce_exact_for_calls_summed_before_the_loss(separate):
    """Deep linear, the calls aggregated before the loss: KFAC-reduce is exact."""
    model = build(SumOfCalls)
    params = list(model.parameters())
    g = generator(4)
    data = batches(
        torch.randn(N, 2, 4, generator=g, dtype=DTYPE),
        torch.randn(N, 2, generator=g, dtype=DTYPE),
        sizes=(4, 5),
    )
    loss = nn.MSELoss(reduction="sum")
    K = KFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type="type-2",
        kfac_approx="reduce",
        separate_weight_and_bias=separate,
    )
    groups = [[0], [1], [2], [3]] if separate else [[0, 1], [2, 3]]
    expected = block_diagonal(dense_ggn(model, loss, params, data), params, groups)
    assert_operator_matches(K, expected, rtol=1e-8, atol=1e-11)


# ==================================================================== a layer applied twice
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def twice_problem():
    model = build(Twice)
    g = generator(5)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE),
        torch.randint(0, 4, (N,), generator=g),
        sizes=(4, 5),
    )
    return model, list(model.parameters()), data, nn.CrossEntropyLoss()


def _eigenbasis_diagonal_matches(EK: EKFACLinearOperator, C: Tensor) -> None:
    """EKFAC's corrected eigenvalues are the exact diagonal of the curvature's blocks in the
    KFAC eigenbasis (the per-datum gradients include every call of a shared weight)."""
    offsets = [0]
    for s in EK._in_shapes:
        offsets.append(offsets[-1] + torch.Size(s).numel())

    def block(i: int) -> Tensor:
        return C[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]]

    for layer in EK._layers:
        f = EK.factors[layer.name]
        lam = EK.eigenvalue_corrections[layer.name]
        QB = EK.eigendecomposition(layer.name, "gradient")[1]
        if f.diagonal_input:
            QA = torch.eye(f.input_factor.shape[0], dtype=DTYPE)
            Q = torch.kron(QA, QB)  # the embedding weight [num, dim] is W_mat transposed
        elif f.input_factor is not None:
            Q = torch.kron(QB, EK.eigendecomposition(layer.name, "input")[1])
        if f.input_factor is not None:
            Cw = block(layer.weight_index)
            torch.testing.assert_close(lam["weight"].reshape(-1), (Q.T @ Cw @ Q).diagonal())
        if "bias" in lam:
            Cb = block(layer.bias_index)
            torch.testing.assert_close(lam["bias"], (QB.T @ Cb @ QB).diagonal())


def test_ekfac_of_a_layer_applied_twice_is_exact_in_its_eigenbasis():
    model, params, data, loss = twice_problem()
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    assert [layer.name for layer in EK._layers] == ["lin", "head"]
    _eigenbasis_diagonal_matches(EK, dense_ggn(model, loss, params, data))


def _gradient_factors(K: KFACLinearOperator) -> Tensor:
    return torch.cat([f.gradient_factor.reshape(-1) for f in K.factors.values()])


def test_type2_factors_of_a_layer_applied_twice_are_the_mc_limit():
    """E[B_mc] = B_type-2 (the gradient factor is linear in the output factors' outer
    products, for every call): a z-test over MC runs with independent seeds (see
    ``test_type2_factors_are_the_mc_limit_on_sequences``)."""
    model, params, data, loss = twice_problem()
    type2 = _gradient_factors(KFACLinearOperator(model, loss, params, data, fisher_type="type-2"))
    runs = torch.stack(
        [
            _gradient_factors(
                KFACLinearOperator(
                    model, loss, params, data, fisher_type="mc", mc_samples=100, seed=seed
                )
            )
            for seed in range(12)
        ]
    )
    mean, bound = runs.mean(0), 4 * runs.var(0).sum() / runs.shape[0]
    assert (mean - type2).square().sum() < bound


def test_weight_shared_by_two_modules_with_own_biases_ekfac_is_exact_in_its_eigenbasis():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    model = build(Tied)
    params = list(model.parameters())
    g = generator(6)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE),
        torch.randn(N, 2, generator=g, dtype=DTYPE),
        sizes=(4, 5),
    )
    loss = nn.MSELoss()
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    assert [(layer.name, layer.weight_index is None) for layer in EK._layers] == [
        ("a", False),
        ("a.bias", True),
        ("b", True),
        ("head", False),
    ]
    _eigenbasis_diagonal_matches(EK, dense_ggn(model, loss, params, data))


# ==================================================================== embedding tied to the head
V, E = 7, 3


class TinyGPT(nn.Module):
    """GPT-2 layout: token embedding, a position-wise block, output layer tied to the embedding."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.wte = nn.Embedding(V, E, padding_idx=0)
        self.mix = nn.Linear(E, E)
        self.lm_head = nn.Linear(E, V, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.wte(ids)))
        return self.lm_head(h).transpose(1, 2)  # [N, V, T]


def gpt_problem():
    tied = build(TinyGPT)
    untied = build(lambda: TinyGPT(tie=False))
    with torch.no_grad():
        untied.wte.weight.copy_(tied.wte.weight)
        untied.lm_head.weight.copy_(tied.wte.weight)
        untied.mix.load_state_dict(tied.mix.state_dict())
    g = generator(7)
    ids = torch.randint(0, V, (N, 4), generator=g)
    ids[2, 3] = ids[5, 0] = 0  # padding tokens
    y = torch.randint(0, V, (N, 4), generator=g)
    y[2, 3] = y[5, 0] = -100
    return tied, untied, batches(ids, y, sizes=(4, 5)), nn.CrossEntropyLoss()


def _rearranged_nearest_kronecker(S: Tensor, m: int, n: int) -> Tensor:
    """The Kronecker product nearest to ``S`` (``[m n, m n]``) from the SVD of its
    rearrangement (Van Loan & Pitsianis, 1993), densely."""
    R = S.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    U, s, Vh = torch.linalg.svd(R)
    return s[0] * torch.kron(U[:, 0].reshape(m, m), Vh[0].reshape(n, n))


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "forward-only"])
def test_tied_embedding_block_is_the_nearest_kronecker_product_of_both_kinds(fisher_type):
    """The tied block is the Kronecker product nearest to the sum of the blocks the two kinds
    of calls have when untied (NOTE [tied embedding and output layer]), with padding."""
    tied, untied, data, loss = gpt_problem()
    options = {"fisher_type": fisher_type}
    K = KFACLinearOperator(tied, loss, list(tied.parameters()), data, **options)
    K_untied = KFACLinearOperator(untied, loss, list(untied.parameters()), data, **options)
    (layer,) = [ly for ly in K._layers if ly.name == "wte"]
    assert isinstance(layer, TiedEmbeddingLinearLayer) and layer.type_name == "Embedding+Linear"
    emb, head = K_untied.factors["wte"], K_untied.factors["lm_head"]
    S = torch.kron(head.gradient_factor, head.input_factor) + torch.kron(
        torch.diag(emb.input_factor), emb.gradient_factor
    )
    f = K.factors["wte"]
    assert f.gradient_factor.shape == (V, V) and f.input_factor.shape == (E, E)
    block = torch.kron(f.gradient_factor, f.input_factor)
    torch.testing.assert_close(block, _rearranged_nearest_kronecker(S, V, E))
    torch.testing.assert_close(f.input_factor.trace(), head.input_factor.trace())
    for factor in (f.gradient_factor, f.input_factor):
        assert torch.linalg.eigvalsh(factor).min() > -1e-12
    mix, mix_untied = K.factors["mix"], K_untied.factors["mix"]
    torch.testing.assert_close(mix.gradient_factor, mix_untied.gradient_factor)


def test_ekfac_of_tied_embedding_is_exact_in_its_eigenbasis():
    tied, _, data, loss = gpt_problem()
    params = list(tied.parameters())
    EK = EKFACLinearOperator(tied, loss, params, data, fisher_type="type-2")
    _eigenbasis_diagonal_matches(EK, dense_ggn(tied, loss, params, data))
    state = EK.state_dict()
    loaded = EKFACLinearOperator(tied, loss, params, data, fisher_type="type-2")
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.to_dense(), EK.to_dense())


def test_tied_embedding_factors_approach_type2_with_mc_samples():
    """Each kind's factors are MC estimates of type-2's and the combination is continuous:
    the tied block converges to type-2's as the number of samples grows."""
    tied, _, data, loss = gpt_problem()
    params = list(tied.parameters())

    def block(**options) -> Tensor:
        f = KFACLinearOperator(tied, loss, params, data, **options).factors["wte"]
        return torch.kron(f.gradient_factor, f.input_factor)

    type2 = block(fisher_type="type-2")

    def error(samples: int) -> float:
        errors = [
            (block(fisher_type="mc", mc_samples=samples, seed=s) - type2).norm() / type2.norm()
            for s in range(3)
        ]
        return float(torch.stack(errors).mean())

    few, many = error(4), error(256)
    assert many < 0.05 and many < few / 4


def test_tied_embedding_inverse_and_refused_reduce():
    tied, _, data, loss = gpt_problem()
    params = list(tied.parameters())
    K = KFACLinearOperator(tied, loss, params, data, fisher_type="type-2")
    damping = 1e-2
    inverse = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
    dense = K.to_dense() + damping * torch.eye(K.shape[0], dtype=DTYPE)
    torch.testing.assert_close(inverse.to_dense() @ dense, torch.eye(K.shape[0], dtype=DTYPE))
    with pytest.raises(NotImplementedError, match="Embedding\\+Linear 'wte'.*use kfac_approx"):
        KFACLinearOperator(tied, loss, params, data, kfac_approx="reduce")


def test_nearest_kronecker_of_sum_is_exact_for_proportional_factors():
    g = generator(8)
    P1 = torch.randn(4, 4, generator=g, dtype=DTYPE)
    P1 = P1 @ P1.T
    Q = torch.randn(3, 3, generator=g, dtype=DTYPE)
    Q = Q @ Q.T
    d = torch.rand(4, generator=g, dtype=DTYPE)
    P, Qc = nearest_kronecker_of_sum([(P1, Q), (d, 2 * Q)])
    torch.testing.assert_close(torch.kron(P, Qc), torch.kron(P1 + 2 * torch.diag(d), Q))
    torch.testing.assert_close(Qc.trace(), Q.trace())
    P, Qc = nearest_kronecker_of_sum([(P1, Q), (d, torch.zeros_like(Q))])
    torch.testing.assert_close(torch.kron(P, Qc), torch.kron(P1, Q))


def test_kfoc_of_calls_as_positions_and_refused_tied_embedding():
    """KFOC approximates the exact block, whose per-datum gradients sum over the calls: the
    same for a layer called per position and once; a tied embedding/head is refused."""
    from curvops.kronecker import KFOCLinearOperator

    one, per = twins()
    data, loss = mse_data(), nn.MSELoss()
    K_one = KFOCLinearOperator(one, loss, list(one.parameters()), data)
    K_per = KFOCLinearOperator(per, loss, list(per.parameters()), data)
    torch.testing.assert_close(K_per.to_dense(), K_one.to_dense(), rtol=1e-10, atol=1e-13)
    tied, _, data, loss = gpt_problem()
    with pytest.raises(NotImplementedError, match="Embedding\\+Linear 'wte': KFOC does not"):
        KFOCLinearOperator(tied, loss, list(tied.parameters()), data)
