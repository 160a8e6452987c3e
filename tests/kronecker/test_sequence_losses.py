"""KFAC, EKFAC and the fallback on sequence losses: per-position type-2 factors, padding,
sequence lengths that differ between batches, and the empirical flavours' conventions."""

from __future__ import annotations

import pytest
import torch
from cases import ToChannelsFirst
from helpers.kronecker_problems import (
    DTYPE,
    MeanOverPositions,
    block_diagonal,
    build,
    generator,
    module_groups,
)
from torch import Tensor, nn

from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator, collection
from curvops.kronecker import kfac as kfac_module
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ef, dense_ggn

EXACT = {"rtol": 1e-8, "atol": 1e-11}


class MixPositions(nn.Module):
    """Running mean over the positions of ``[N, T, H]`` (couples positions, no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)
        return x.cumsum(dim=1) / steps


def mixing_net() -> nn.Module:
    """Linear, LayerNorm (fallback), tanh, position mixing, linear head: [N, C=3, T]."""
    return nn.Sequential(
        nn.Linear(3, 4),
        nn.LayerNorm(4),
        nn.Tanh(),
        MixPositions(),
        nn.Linear(4, 3),
        ToChannelsFirst(),
    )


def positionwise_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), ToChannelsFirst())


def padded_data(lengths: list[list[int]], T: int = 4, seed: int = 1, ignore: int = -100):
    """Batches of ``[N_B, T, 3]`` inputs and class targets padded with ``ignore`` per length."""
    g = generator(seed)
    data = []
    for ls in lengths:
        X = torch.randn(len(ls), T, 3, generator=g, dtype=DTYPE)
        y = torch.randint(0, 3, (len(ls), T), generator=g)
        for n, length in enumerate(ls):
            y[n, length:] = ignore
        data.append((X, y))
    return data


LENGTHS = [[4, 2, 3], [1, 0], [3, 4, 4, 2]]


def fallback_diagonal(K: KFACLinearOperator, params: list[Tensor], names: list[str]) -> Tensor:
    return torch.cat([K.fallback_diagonals[n].reshape(-1) for n in names])


def dense_diagonal(M: Tensor, params: list[Tensor], indices: list[int]) -> Tensor:
    blocks = M.diagonal().split([p.numel() for p in params])
    return torch.cat([blocks[i] for i in indices])


# ==================================================================== exact diagonals
@pytest.mark.parametrize(
    "fisher_type, kfac_approx, reference",
    [
        ("type-2", "expand", lambda *a: dense_ggn(*a)),
        ("type-2", "reduce", lambda *a: dense_ggn(*a)),
        ("empirical", "expand", lambda *a: dense_ef(*a, gradient_of="loss-term")),
        ("empirical", "reduce", lambda *a: dense_ef(*a, gradient_of="datum")),
    ],
)
def test_fallback_diagonal_on_sequences_is_exact(fisher_type, kfac_approx, reference):
    """Padded cross-entropy on [N, C, T] through a net that mixes positions: the fallback
    (LayerNorm) holds the exact diagonal of the GGN (type-2) or of the empirical Fisher in
    the convention the flavour approximates."""
    model = build(mixing_net)
    params = list(model.parameters())
    data = padded_data(LENGTHS)
    loss = nn.CrossEntropyLoss()
    K = KFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        fallback="diagonal",
    )
    expected = dense_diagonal(reference(model, loss, params, data), params, [2, 3])
    torch.testing.assert_close(fallback_diagonal(K, params, ["1.weight", "1.bias"]), expected)


@pytest.mark.parametrize(
    "fisher_type, kfac_approx, reference",
    [
        ("type-2", "expand", lambda *a: dense_ggn(*a)),
        ("empirical", "expand", lambda *a: dense_ef(*a, gradient_of="loss-term")),
        ("empirical", "reduce", lambda *a: dense_ef(*a, gradient_of="datum")),
    ],
)
def test_ekfac_corrections_on_sequences_are_the_exact_diagonal(fisher_type, kfac_approx, reference):
    """EKFAC's eigenvalues are diag(Q^T C Q) of the block it approximates, in its basis."""
    model = build(mixing_net)
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    data = padded_data(LENGTHS)
    loss = nn.CrossEntropyLoss()
    EK = EKFACLinearOperator(
        model, loss, params, data, fisher_type=fisher_type, kfac_approx=kfac_approx
    )
    C = reference(model, loss, params, data)
    sizes = [p.numel() for p in params]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    for name, f in EK.factors.items():
        QB = EK.eigendecomposition(name, "gradient")[1]
        QA = EK.eigendecomposition(name, "input")[1]
        lam = EK.eigenvalue_corrections[name]
        w, b = EK.param_names.index(f.weight_name), EK.param_names.index(f.bias_name)
        Cw = C[offsets[w] : offsets[w + 1], offsets[w] : offsets[w + 1]]
        Cb = C[offsets[b] : offsets[b + 1], offsets[b] : offsets[b + 1]]
        Q = torch.kron(QB, QA)
        torch.testing.assert_close(lam["weight"].reshape(-1), (Q.T @ Cw @ Q).diagonal())
        torch.testing.assert_close(lam["bias"], (QB.T @ Cb @ QB).diagonal())


# ==================================================================== the MC limit
def _gradient_factors(K: KFACLinearOperator) -> Tensor:
    return torch.cat([f.gradient_factor.reshape(-1) for f in K.factors.values()])


def test_type2_factors_are_the_mc_limit_on_sequences(monkeypatch):
    """E[B_mc] = B_type-2 exactly (the would-be gradients of different positions are
    independent with mean zero), so type-2's gradient factors must pass a z-test against MC
    runs with independent seeds: with R runs the mean's squared error is sum(var) / R in
    expectation; we allow 4 times that (a chi-square-like statistic over the 25 entries of
    both gradient factors; exceeding 4 times its mean is very unlikely for a sum of many
    terms). The factors from shared, unsplit type-2 columns (the old behaviour) fail it."""
    model = build(mixing_net)
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    data = padded_data(LENGTHS)
    loss = nn.CrossEntropyLoss()
    type2 = _gradient_factors(KFACLinearOperator(model, loss, params, data, fisher_type="type-2"))
    runs = torch.stack(
        [
            _gradient_factors(
                KFACLinearOperator(
                    model, loss, params, data, fisher_type="mc", mc_samples=200, seed=seed
                )
            )
            for seed in range(16)
        ]
    )
    mean, bound = runs.mean(0), 4 * runs.var(0).sum() / runs.shape[0]
    assert (mean - type2).square().sum() < bound
    original = kfac_module.statistics_pass

    def shared_columns(*args, **kwargs):
        return original(*args, **{**kwargs, "split_positions": False})

    monkeypatch.setattr(kfac_module, "statistics_pass", shared_columns)
    shared = _gradient_factors(KFACLinearOperator(model, loss, params, data, fisher_type="type-2"))
    assert (mean - shared).square().sum() > 10 * bound


def test_type2_columns_are_formed_in_memory_bounded_chunks(monkeypatch):
    """C * P split columns, never all at once; any chunking gives the same factors."""
    model = build(positionwise_net)
    params = list(model.parameters())
    data = padded_data([[4, 4, 4]])
    loss = nn.CrossEntropyLoss()
    whole = [
        cls(model, loss, params, data, fisher_type="type-2").to_dense()
        for cls in (KFACLinearOperator, EKFACLinearOperator)
    ]
    per_column = 3 * 4 * (4 + 3) + 3 * 3 * 4  # layer outputs + the output, per column
    monkeypatch.setattr(collection, "FACTOR_CHUNK_ELEMENTS", 5 * per_column)
    sizes = []
    original = collection._backpropagate

    def recording(output, layer_outputs, S, retain_graph=False):
        sizes.append(S.shape[0])
        return original(output, layer_outputs, S, retain_graph=retain_graph)

    monkeypatch.setattr(collection, "_backpropagate", recording)
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    torch.testing.assert_close(K.to_dense(), whole[0])
    assert sizes == [5, 5, 2]  # 3 classes x 4 positions
    EK = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    torch.testing.assert_close(EK.to_dense(), whole[1])


# ==================================================================== padding, lengths
def varlen_padded_data():
    """Padded batches whose sequence lengths T also differ (4, 6, 2)."""
    return [
        padded_data([ls], T=T, seed=seed)[0]
        for seed, (ls, T) in enumerate(([[4, 2, 3], 4], [[1, 6], 6], [[2, 2, 0, 1], 2]))
    ]


@pytest.mark.parametrize("make_data", [lambda: padded_data(LENGTHS), varlen_padded_data])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_padding_keeps_kfac_exact(cls, separate, make_data):
    """One linear layer whose logits do not depend on its input (zero weight): the loss
    Hessian is the same at every counting position, so type-2 KFAC-expand equals the GGN's
    blocks exactly, provided A averages over the non-padded positions only and the batches
    are weighted by their numbers of counting targets (also with T differing per batch)."""
    model = build(lambda: nn.Sequential(nn.Linear(3, 3), ToChannelsFirst()))
    with torch.no_grad():
        model[0].weight.zero_()
    params = list(model.parameters())
    data = make_data()
    loss = nn.CrossEntropyLoss()
    K = cls(model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=separate)
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, separate)
    )
    assert_operator_matches(K, expected, **EXACT)


def test_ignored_data_keep_kfac_reduce_exact():
    """Positions averaged before the loss, some data ignored: KFAC-reduce stays exact."""
    model = build(lambda: nn.Sequential(nn.Linear(3, 3), MeanOverPositions()))
    with torch.no_grad():
        model[0].weight.zero_()
    params = list(model.parameters())
    g = generator(4)
    data = []
    for n in (4, 3, 5):
        y = torch.randint(0, 3, (n,), generator=g)
        y[: n // 2] = -100
        data.append((torch.randn(n, 4, 3, generator=g, dtype=DTYPE), y))
    loss = nn.CrossEntropyLoss()
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", kfac_approx="reduce")
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, True)
    )
    assert_operator_matches(K, expected, **EXACT)


@pytest.mark.parametrize(
    "cls, fisher_type",
    [(KFACLinearOperator, t) for t in ("type-2", "empirical", "mc", "forward-only")]
    + [(EKFACLinearOperator, t) for t in ("type-2", "empirical", "mc")],
)
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_padding_at_the_end_equals_truncation(cls, fisher_type, kfac_approx):
    """A position-wise net: padding positions of a batch gives the same KFAC and EKFAC as
    cutting them off (A ignores padded positions, the output factors are zero there, and MC
    draws no labels there)."""
    model = build(positionwise_net)
    params = list(model.parameters())
    padded = padded_data([[2, 2, 2], [3, 3], [1, 1, 1, 1]])
    cut = []
    for X, y in padded:
        length = int((y[0] != -100).sum())
        cut.append((X[:, :length], y[:, :length]))
    loss = nn.CrossEntropyLoss()
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx, "seed": 3}
    a = cls(model, loss, params, padded, **options).to_dense()
    b = cls(model, loss, params, cut, **options).to_dense()
    torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_sequence_lengths_differing_between_batches_keep_kfac_exact(cls):
    """Deep linear net, MSE per position, T = 2, 5, 1 in three batches: type-2 KFAC-expand
    equals the GGN's blocks (the batch weights count N_B * T_B * D terms per batch)."""
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    params = list(model.parameters())
    g = generator(6)
    data = [
        (
            torch.randn(n, t, 3, generator=g, dtype=DTYPE),
            torch.randn(n, t, 2, generator=g, dtype=DTYPE),
        )
        for n, t in ((4, 2), (3, 5), (5, 1))
    ]
    loss = nn.MSELoss()
    K = cls(model, loss, params, data, fisher_type="type-2")
    expected = block_diagonal(
        dense_ggn(model, loss, params, data), params, module_groups(model, params, True)
    )
    assert_operator_matches(K, expected, **EXACT)


def _bias_blocks(M: Tensor, params: list[Tensor], names: list[str]) -> list[Tensor]:
    sizes = [p.numel() for p in params]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    out = []
    for i, name in enumerate(names):
        if name.endswith("bias"):
            out.append(M[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]])
    return out


@pytest.mark.parametrize("kfac_approx, gradient_of", [("expand", "loss-term"), ("reduce", "datum")])
@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.2)],
    ids=["ce", "smooth"],
)
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_empirical_flavours_approximate_their_ef_convention(cls, loss, kfac_approx, gradient_of):
    """Bias blocks see a constant input, so they are exact: empirical KFAC-expand's equal the
    empirical Fisher per loss term, KFAC-reduce's the one per datum (padded sequences)."""
    model = build(positionwise_net)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    data = padded_data(LENGTHS)
    K = cls(model, loss, params, data, fisher_type="empirical", kfac_approx=kfac_approx)
    E = dense_ef(model, loss, params, data, gradient_of=gradient_of)
    flip = {"datum": "loss-term", "loss-term": "datum"}
    other = dense_ef(model, loss, params, data, gradient_of=flip[gradient_of])
    for k, e, o in zip(
        _bias_blocks(K.to_dense(), params, names),
        _bias_blocks(E, params, names),
        _bias_blocks(other, params, names),
    ):
        torch.testing.assert_close(k, e, **EXACT)
        assert (k - o).abs().max() > 1e-3 * o.abs().max()  # the other convention differs


def test_label_smoothing_keeps_type2_and_class_weights_are_refused():
    """Smoothing changes the labels, not the model's likelihood: type-2 KFAC is unchanged."""
    model = build(positionwise_net)
    params = list(model.parameters())
    data = padded_data(LENGTHS)
    plain = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2")
    smooth = KFACLinearOperator(
        model, nn.CrossEntropyLoss(label_smoothing=0.3), params, data, fisher_type="type-2"
    )
    torch.testing.assert_close(smooth.to_dense(), plain.to_dense(), rtol=1e-12, atol=0)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE))
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        with pytest.raises(NotImplementedError, match="with class weights"):
            cls(model, weighted, params, data, fisher_type="type-2")
