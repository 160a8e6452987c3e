"""Exact diagonals of the GGN, empirical and Monte-Carlo Fisher against dense float64 truths."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from cases import DTYPE, FISHER_CASES, case_ids, make_case
from torch import Tensor, nn

from curvops import (
    BlockDiagonalLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    IdentityLinearOperator,
    LinearOperator,
    NonDeterministicError,
)
from curvops.testing.dense import dense_ef, dense_ggn

TOL = {"rtol": 1e-10, "atol": 1e-13}


def _build(cls, case, data=None, **kwargs):
    data = case.data if data is None else data
    kwargs = {"batch_size_fn": case.batch_size_fn} | kwargs
    return cls(case.model_func, case.loss_func, case.params, data, **kwargs)


def _assert_exact(op, reference: Tensor) -> Tensor:
    """``op.diagonal()`` is flat, equals the operator's own dense diagonal and ``reference``."""
    d = op.diagonal()
    assert d.shape == (op.shape[0],) and d.dtype == op.dtype
    torch.testing.assert_close(d, op.to_dense().diagonal(), **TOL)
    torch.testing.assert_close(d, reference, **TOL)
    torch.testing.assert_close(op.trace(), reference.sum(), **TOL)
    return d


# ==================================================================== every registry case
@pytest.mark.parametrize("name", case_ids())
def test_ggn_diagonal(name):
    case = make_case(name)
    kw = {"batch_size_fn": case.batch_size_fn}
    dense = dense_ggn(case.model_func, case.loss_func, case.params, case.data, **kw)
    _assert_exact(_build(GGNLinearOperator, case), dense.diagonal())


@pytest.mark.parametrize("gradient_of", ["loss-term", "datum"])
@pytest.mark.parametrize("name", FISHER_CASES)
def test_empirical_fisher_diagonal(name, gradient_of):
    case = make_case(name)
    kw = {"batch_size_fn": case.batch_size_fn, "gradient_of": gradient_of}
    dense = dense_ef(case.model_func, case.loss_func, case.params, case.data, **kw)
    _assert_exact(_build(EFLinearOperator, case, gradient_of=gradient_of), dense.diagonal())


@pytest.mark.parametrize("name", FISHER_CASES)
def test_mc_fisher_diagonal_is_that_of_the_same_matrix(name):
    """Same seed, same would-be labels: the diagonal of the MC operator's own dense matrix."""
    case = make_case(name)
    F1 = _build(FisherMCLinearOperator, case, mc_samples=3, seed=5)
    d = F1.diagonal()
    torch.testing.assert_close(d, F1.to_dense().diagonal(), **TOL)
    torch.testing.assert_close(d, F1.diagonal(), rtol=0, atol=0)  # re-seeded every pass
    # a fresh operator with the same seed is the same matrix; another seed is not
    F1b = _build(FisherMCLinearOperator, case, mc_samples=3, seed=5)
    torch.testing.assert_close(F1b.diagonal(), d, rtol=0, atol=0)
    d2 = _build(FisherMCLinearOperator, case, mc_samples=3, seed=6).diagonal()
    assert (d2 - d).abs().max() > 1e-6 * d.abs().max()


def test_batching_never_changes_the_diagonal():
    """Three uneven batches give the diagonal of one batch holding all data."""
    case = make_case("mlp-ce-mean")
    whole = [(torch.cat([X for X, _ in case.data]), torch.cat([y for _, y in case.data]))]
    for cls in (GGNLinearOperator, EFLinearOperator):
        split = _build(cls, case).diagonal()
        torch.testing.assert_close(split, _build(cls, case, data=whole).diagonal(), **TOL)


# ==================================================================== several rows per datum
class TinyCausalLM(nn.Module):
    """Embedding, causal self-attention (positions interact) and a head, flattened to
    ``[N * T, vocab]`` as language models feed ``CrossEntropyLoss``: a datum owns T rows."""

    def __init__(self, vocab: int = 5, dim: int = 4):
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.tanh(h)).reshape(-1, self.vocab)


def _token_problem(reduction: str = "mean"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = TinyCausalLM().to(DTYPE).eval()
        data = [(torch.randint(0, 5, (n, 3)), torch.randint(0, 5, (n * 3,))) for n in (2, 3)]
    return model, nn.CrossEntropyLoss(reduction=reduction), list(model.parameters()), data


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rows_of_a_sequence_are_separate_data(reduction):
    model, loss, params, data = _token_problem(reduction)
    ggn = GGNLinearOperator(model, loss, params, data)
    _assert_exact(ggn, dense_ggn(model, loss, params, data).diagonal())
    ef = EFLinearOperator(model, loss, params, data)
    # the reference's data are the output rows (the operator splits X into its sequences)
    per_row = dense_ef(model, loss, params, data, batch_size_fn=lambda X: X.numel())
    _assert_exact(ef, per_row.diagonal())
    mc = FisherMCLinearOperator(model, loss, params, data, mc_samples=2)
    torch.testing.assert_close(mc.diagonal(), mc.to_dense().diagonal(), **TOL)


@pytest.mark.parametrize("cls", [GGNLinearOperator, EFLinearOperator])
def test_chunks_of_data_and_columns_give_the_same_diagonal(cls):
    """A budget of one gradient per pass (one datum, one column) changes nothing."""
    ops = [_build(cls, make_case("seq-ce-mean")), cls(*_token_problem())]
    for op in ops:
        torch.testing.assert_close(op.diagonal(memory_budget=1), op.diagonal(), **TOL)


class Encoding(UserDict):
    """A mapping input with attribute access and ``.to``, like HuggingFace's BatchEncoding."""

    def __getattr__(self, name: str) -> Tensor:
        if name == "data":
            raise AttributeError(name)
        return self.data[name]

    def to(self, device) -> Encoding:
        return Encoding({k: v.to(device) for k, v in self.data.items()})


class EncodingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 2)
        self.out = nn.Linear(4, 3)

    def forward(self, X: Encoding) -> Tensor:
        return self.out(torch.tanh(self.conv(X.x)).flatten(1) * X.scale)


def test_mapping_inputs_keep_their_type():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = EncodingModel().to(DTYPE)
        data = [
            (Encoding(x=torch.randn(n, 2, 3, dtype=DTYPE), scale=torch.tensor(0.5).double()), y)
            for n, y in ((2, torch.randint(0, 3, (2,))), (3, torch.randint(0, 3, (3,))))
        ]
    args = (model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    G = GGNLinearOperator(*args, batch_size_fn=lambda X: X.x.shape[0])
    torch.testing.assert_close(G.diagonal(), G.to_dense().diagonal(), **TOL)


# ==================================================================== the linear closed form
class LinearTwice(nn.Module):
    """One ``nn.Linear`` applied twice (called twice: no closed form)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class HiddenReuse(nn.Module):
    """A layer called once whose weight is used again in plain code, which hooks cannot see."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.out(h + 0.5 * torch.tanh(h @ self.lin.weight.T))


class TiedHead(nn.Module):
    """An embedding tied to the output layer (GPT-2 layout): a parameter of two modules."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


@pytest.mark.parametrize("model_cls", [LinearTwice, HiddenReuse, TiedHead])
def test_layers_used_more_than_once_get_the_exact_diagonal(model_cls):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = model_cls().to(DTYPE)
        tokens = model_cls is TiedHead
        if tokens:
            data = [(torch.randint(0, 5, (n,)), torch.randint(0, 5, (n,))) for n in (3, 4)]
        else:
            data = [(torch.randn(n, 3, dtype=DTYPE), torch.randn(n, 2).double()) for n in (3, 4)]
    loss = nn.CrossEntropyLoss() if tokens else nn.MSELoss()
    params = list(model.parameters())
    for cls in (GGNLinearOperator, EFLinearOperator):
        op = cls(model, loss, params, data)
        torch.testing.assert_close(op.diagonal(), op.to_dense().diagonal(), **TOL)


class RowsFromOneInput(nn.Module):
    """One input row per datum, ``T = 2`` output rows per datum: closed form with T > 1."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2 * 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).reshape(-1, 3)


def test_several_rows_per_datum_with_the_linear_closed_form():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = RowsFromOneInput().to(DTYPE)
        data = [(torch.randn(n, 3, dtype=DTYPE), torch.randint(0, 3, (2 * n,))) for n in (2, 3)]
    args = (model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    for cls in (GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator):
        op = cls(*args)
        torch.testing.assert_close(op.diagonal(), op.to_dense().diagonal(), **TOL)


# ==================================================================== structure and state
def test_block_diagonal_of_curvature_blocks():
    """Blocks that are curvature operators on parameter subsets, on interleaved entries."""
    case = make_case("mlp-ce-mean")
    p = case.params
    args = (case.model_func, case.loss_func)
    first = GGNLinearOperator(*args, [p[0], p[2]], case.data)
    second = EFLinearOperator(*args, [p[1], p[3]], case.data)
    B = BlockDiagonalLinearOperator([first, second], [[0, 2], [1, 3]])
    torch.testing.assert_close(B.diagonal(), B.to_dense().diagonal(), **TOL)
    torch.testing.assert_close(B.trace(), B.to_dense().trace(), **TOL)
    H = HessianLinearOperator(*args, [p[1], p[3]], case.data)
    with pytest.raises(NotImplementedError, match="hutchinson_diag"):
        BlockDiagonalLinearOperator([first, H], [[0, 2], [1, 3]]).diagonal()


class Doubling(LinearOperator):
    """``2 I`` through products only (no closed forms)."""

    is_self_adjoint = True

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return [2 * x for x in X]


def test_sums_and_multiples_of_curvature_operators():
    """Lazy sums (damping, scaling) add their terms' diagonals and traces."""
    case = make_case("mlp-ce-mean")
    G = _build(GGNLinearOperator, case)
    eye = IdentityLinearOperator(G.in_shapes, dtype=G.dtype, device=G.device)
    A = 2.0 * G - _build(EFLinearOperator, case) + 1e-3 * eye
    torch.testing.assert_close(A.diagonal(), A.to_dense().diagonal(), **TOL)
    torch.testing.assert_close(A.trace(), A.to_dense().trace(), **TOL)
    p = case.params
    rest = IdentityLinearOperator([tuple(q.shape) for q in p[2:]], dtype=G.dtype, device="cpu")
    first = GGNLinearOperator(case.model_func, case.loss_func, p[:2], case.data)
    B = 3.0 * BlockDiagonalLinearOperator([first, rest])
    torch.testing.assert_close(B.diagonal(), B.to_dense().diagonal(), **TOL)
    other = Doubling(G.in_shapes, G.out_shapes, dtype=G.dtype, device=G.device)
    with pytest.raises(NotImplementedError, match=r"Doubling has no diagonal\(\).*hutchinson_diag"):
        (G + other).diagonal()
    with pytest.raises(NotImplementedError, match=r"Doubling has no trace\(\).*hutchinson_trace"):
        (G + other).trace()


def test_callers_state_is_untouched():
    case = make_case("mlp-ce-mean")
    model = case.model_func
    model.train()  # no dropout or normalisation: still deterministic
    grads = [torch.full_like(p, 7.0) for p in case.params]
    for p, g in zip(case.params, grads):
        p.grad = g.clone()
    rng = torch.get_rng_state()
    _build(FisherMCLinearOperator, case).diagonal()
    _build(GGNLinearOperator, case).diagonal()
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p.requires_grad for p in case.params)
    for p, g in zip(case.params, grads):
        assert torch.equal(p.grad, g)


def test_progressbar(capsys):
    case = make_case("mlp-mse-sum")
    _build(GGNLinearOperator, case, progressbar=True).diagonal()
    assert "GGNLinearOperator diagonal" in capsys.readouterr().err


# ==================================================================== errors
class BatchCentred(nn.Module):
    """Subtracts the batch mean: a datum's output depends on the other data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return h - h.mean(dim=0)


class ExtraRow(nn.Module):
    """Appends a row to the output: rows are not a multiple of the data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return torch.cat([h, h[:1]])


class SquaredSumLoss(nn.Module):
    """A loss of the summed outputs: it couples the data."""

    reduction = "sum"

    def forward(self, output: Tensor, y: Tensor) -> Tensor:
        return (output.sum(dim=0) - y.sum(dim=0)).square().sum()


def _regression(model: nn.Module, extra_rows: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model.to(DTYPE)
        X = torch.randn(4, 3, dtype=DTYPE)
        y = torch.randn(4 + extra_rows, 2, dtype=DTYPE)
    return model, list(model.parameters()), [(X, y)]


def test_output_rows_that_depend_on_other_data_are_refused():
    model, params, data = _regression(BatchCentred())
    G = GGNLinearOperator(model, nn.MSELoss(), params, data)
    with pytest.raises(ValueError, match="depends on other data"):
        G.diagonal()


def test_output_rows_not_a_multiple_of_the_data_are_refused():
    model, params, data = _regression(ExtraRow(), extra_rows=1)
    E = EFLinearOperator(model, nn.MSELoss(), params, data)
    with pytest.raises(ValueError, match=r"shape \(5, 2\) for a batch of 4 data"):
        E.diagonal()


def test_loss_coupling_the_data_is_refused():
    model, params, data = _regression(nn.Linear(3, 2))
    G = GGNLinearOperator(model, SquaredSumLoss(), params, data)
    with pytest.raises(ValueError, match="couples different rows"):
        G.diagonal()


def test_random_forward_pass_is_refused():
    torch.manual_seed(0)
    model, params, data = _regression(nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 2)))
    G = GGNLinearOperator(model, nn.MSELoss(), params, data, check_deterministic=False)
    with pytest.raises(NonDeterministicError, match="dropout"):
        G.diagonal()


def test_hessian_points_to_the_estimators():
    case = make_case("mlp-ce-mean")
    H = _build(HessianLinearOperator, case)
    with pytest.raises(NotImplementedError, match=r"hutchinson_diag.*xdiag.*GGNLinearOperator"):
        H.diagonal()
    with pytest.raises(NotImplementedError, match=r"hutchinson_trace.*xtrace.*GGNLinearOperator"):
        H.trace()


# ==================================================================== row-wise models
def _ce_mlp(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DTYPE)
        data = [(torch.randn(n, 3, dtype=DTYPE), torch.randint(0, 4, (n,))) for n in (3, 5)]
    return model, data


@pytest.mark.parametrize("cls", [GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator])
def test_row_wise_models_skip_the_safeguards_and_stay_exact(cls, monkeypatch):
    """NOTE [row-wise models]: no per-datum pass and no probe, same diagonal as the dense one."""
    import curvops.curvature.diagonal_linear as closed_form
    import curvops.curvature.diagonals as diagonals

    model, data = _ce_mlp(7)
    loss = nn.CrossEntropyLoss(reduction="sum")
    params = list(model.parameters())
    kwargs = {"seed": 3} if cls is FisherMCLinearOperator else {}
    reference = cls(model, loss, params, data, **kwargs).to_dense().diagonal()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a safeguard ran for a row-wise model")

    monkeypatch.setattr(diagonals, "_per_datum_pass", must_not_run)
    monkeypatch.setattr(closed_form, "_verified", must_not_run)
    d = cls(model, loss, params, data, **kwargs).diagonal()
    torch.testing.assert_close(d, reference, **TOL)
    # a hook (which could couple the data) brings the safeguards back
    model[1].register_forward_hook(lambda m, i, o: o - o.mean(dim=0))
    with pytest.raises(AssertionError, match="a safeguard ran"):
        cls(model, loss, params, data, **kwargs).diagonal()


def test_a_hook_coupling_the_data_is_still_refused():
    model, data = _ce_mlp(8)
    model[1].register_forward_hook(lambda m, i, o: o - o.mean(dim=0))
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    with pytest.raises(ValueError, match="depends on other data"):
        G.diagonal()


def test_a_weight_shared_by_two_layers_of_a_sequential_gets_the_exact_diagonal():
    model, data = _ce_mlp(9)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 4))
    model = model.to(DTYPE)
    model[2].weight = model[0].weight  # one parameter, two layers: no closed form for it
    params = list(model.parameters())
    for cls in (GGNLinearOperator, EFLinearOperator):
        op = cls(model, nn.CrossEntropyLoss(), params, data)
        torch.testing.assert_close(op.diagonal(), op.to_dense().diagonal(), **TOL)
