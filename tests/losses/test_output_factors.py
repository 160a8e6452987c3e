"""Output factors of Fisher-type matrices against autograd (NOTE [output factors])."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import hessian

from curvops.kronecker.collection import separate_output_positions
from curvops.losses import make_loss_spec

DTYPE = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ce_problem(loss=None):
    g = _gen(1)
    out = torch.randn(3, 4, 2, 3, generator=g, dtype=DTYPE)  # [N, C, T1, T2]
    y = torch.randint(0, 4, (3, 2, 3), generator=g)
    y[0, 1, :] = -100  # padding
    y[2, 0, 0] = -100
    return loss or nn.CrossEntropyLoss(), out, y


PROBLEMS = {
    "ce-positions-padded": _ce_problem,
    "ce-smoothed-padded": lambda: _ce_problem(nn.CrossEntropyLoss(label_smoothing=0.2)),
    "ce-sum": lambda: _ce_problem(nn.CrossEntropyLoss(reduction="sum")),
    "mse-sequence": lambda: (
        nn.MSELoss(),
        torch.randn(3, 4, 2, generator=_gen(2), dtype=DTYPE),
        torch.randn(3, 4, 2, generator=_gen(3), dtype=DTYPE),
    ),
    "mse-scalar-data": lambda: (
        nn.MSELoss(),
        torch.randn(5, generator=_gen(2), dtype=DTYPE),
        torch.randn(5, generator=_gen(3), dtype=DTYPE),
    ),
    "bce-sequence": lambda: (
        nn.BCEWithLogitsLoss(),
        torch.randn(3, 2, 4, generator=_gen(4), dtype=DTYPE),
        torch.randint(0, 2, (3, 2, 4), generator=_gen(5)).to(DTYPE),
    ),
}


def _per_datum_outer(S):
    """``sum_k s_k[n] s_k[n]^T`` per datum, ``[N, M, M]``."""
    flat = S.reshape(S.shape[0], S.shape[1], -1)
    return torch.einsum("kni,knj->nij", flat, flat)


def _columns(spec, S, split, step=None):
    cols = spec.factor_columns(S, split_positions=split)
    if step is None:
        return cols(0, cols.num_columns)
    return torch.cat([c for _, _, c in cols.chunks(step)])


def _datum_hessians(loss, out, y):
    """Output Hessian of each datum's batch-scaled loss by torch.func, ``[N, M, M]``."""
    total = copy.copy(loss)
    total.reduction = "sum"
    spec = make_loss_spec(loss)
    R = spec.reduction_factor(y, out.shape[0])
    blocks = []
    for n in range(out.shape[0]):
        H = hessian(lambda o, n=n: total(o, y[n : n + 1]))(out[n : n + 1])
        blocks.append(R * H.reshape(out[n].numel(), out[n].numel()))
    return torch.stack(blocks)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_split_type2_columns_factorise_the_loss_hessian(name):
    loss, out, y = PROBLEMS[name]()
    spec = make_loss_spec(loss)
    S = spec.shared_output_factors(out, y, "type-2")
    split = _columns(spec, S, True)
    H = _datum_hessians(loss, out, y)
    torch.testing.assert_close(_per_datum_outer(split), H)
    for step in (1, 5, 1000):  # any chunking gives the same columns
        torch.testing.assert_close(_columns(spec, S, True, step), split)
    # output_factors returns them all at once; splitting them again changes nothing
    exact = spec.output_factors(out, y, "type-2")
    torch.testing.assert_close(_per_datum_outer(exact), H)
    if isinstance(loss, nn.CrossEntropyLoss):
        torch.testing.assert_close(_per_datum_outer(separate_output_positions(exact)), H)


def test_shared_type2_columns_couple_positions():
    """Without splitting, cross-position blocks appear that the loss Hessian lacks."""
    loss, out, y = _ce_problem()
    spec = make_loss_spec(loss)
    S = spec.shared_output_factors(out, y, "type-2")
    torch.testing.assert_close(
        _per_datum_outer(separate_output_positions(S)), _datum_hessians(loss, out, y)
    )
    assert S.shape[0] == 4 and spec.factor_columns(S, split_positions=True).num_columns > 4
    diff = _per_datum_outer(S) - _datum_hessians(loss, out, y)
    assert diff.abs().max() > 1e-2


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_empirical_columns_are_term_or_datum_gradients(name):
    loss, out, y = PROBLEMS[name]()
    spec = make_loss_spec(loss)
    R = spec.reduction_factor(y, out.shape[0])
    S = spec.shared_output_factors(out, y, "empirical")
    torch.testing.assert_close(spec.output_factors(out, y, "empirical"), S)
    # per loss term: gradients of the reduction='none' losses, one position at a time
    none = copy.copy(loss)
    none.reduction = "none"
    o = out.clone().requires_grad_(True)
    terms = none(o, y)
    if not isinstance(loss, nn.CrossEntropyLoss) and terms.ndim >= 2:
        terms = terms.sum(-1)
    N = out.shape[0]
    per_term = torch.zeros(N, out[0].numel(), out[0].numel(), dtype=DTYPE)
    for n, row in enumerate(terms.reshape(N, -1)):
        for t in row:
            (g,) = torch.autograd.grad(t, o, retain_graph=True)
            per_term[n] += torch.outer(g[n].reshape(-1), g[n].reshape(-1))
    torch.testing.assert_close(_per_datum_outer(_columns(spec, S, True)), R * per_term)
    # per datum: gradient of the datum's summed loss
    total = copy.copy(loss)
    total.reduction = "sum"
    (g,) = torch.autograd.grad(total(o, y), o)
    torch.testing.assert_close(_per_datum_outer(S), R * _per_datum_outer(g.unsqueeze(0)))


def test_mc_columns_skip_ignored_positions():
    loss, out, y = _ce_problem()
    spec = make_loss_spec(loss)
    S = spec.output_factors(out, y, "mc", mc_samples=6, generator=_gen(7))
    ignored = (y == -100).unsqueeze(1).expand_as(out)
    assert S[:, ignored].abs().max() == 0 and S[:, ~ignored].abs().max() > 0
    # the draws at kept positions do not depend on padding elsewhere (here: a cut position)
    cut = spec.output_factors(out[..., :2], y[..., :2], "mc", mc_samples=6, generator=_gen(7))
    y_pad = torch.cat([y[..., :2], torch.full_like(y[..., 2:], -100)], dim=-1)
    padded = spec.output_factors(out, y_pad, "mc", mc_samples=6, generator=_gen(7))
    # same draws at the kept positions; the normaliser differs only by the ignored targets
    R_cut, R_pad = spec.reduction_factor(y[..., :2], 3), spec.reduction_factor(y_pad, 3)
    assert R_cut == R_pad
    torch.testing.assert_close(padded[..., :2], cut)
    assert padded[..., 2:].abs().max() == 0


def test_mc_columns_converge_to_the_loss_hessian_per_position():
    """E[sum_s s_s s_s^T] per position is the loss Hessian (cross-position terms vanish).

    With S = 40000 draws the relative error of the sample average is ~1/sqrt(S) times a
    constant of order 1-3 here, so 0.05 leaves a wide margin while a missing split (off by
    the full cross-position blocks, relative size ~1) or a wrong scale would fail.
    """
    loss, out, y = _ce_problem()
    spec = make_loss_spec(loss)
    S = spec.output_factors(out, y, "mc", mc_samples=40000, generator=_gen(8))
    H = _datum_hessians(loss, out, y)
    mc = _per_datum_outer(S)
    assert (mc - H).norm() / H.norm() < 0.05


def test_mc_labels_follow_the_class_probabilities():
    """Inverse-CDF draws: label frequencies match the softmax, one label per draw.

    Classes of probability zero are never drawn, and float32 cumulative probabilities whose
    last entry falls below 1 still give valid labels. With 200,000 draws the frequencies'
    standard deviation is at most 0.0012, so 0.006 is five of them.
    """
    spec = make_loss_spec(nn.CrossEntropyLoss())
    inf = float("inf")
    logits = torch.tensor([[0.0, -inf, 1.0, 2.0], [5.0, 5.0, -inf, -inf], [0.3, 0.1, 0.2, 9.0]])
    draws = 200_000
    G = spec.sampled_gradients(logits, torch.zeros(3, dtype=torch.long), draws, _gen(3))
    labels = (logits.softmax(dim=1) - G).round()  # the drawn labels, one-hot [S, N, C]
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    assert (labels.sum(dim=-1) == 1).all()
    frequencies = labels.mean(dim=0)
    assert frequencies[0, 1] == 0 and (frequencies[1, 2:] == 0).all()
    torch.testing.assert_close(frequencies, logits.softmax(dim=1), rtol=0, atol=0.006)


def test_target_checks():
    spec = make_loss_spec(nn.CrossEntropyLoss())
    out = torch.randn(2, 3, 4, dtype=DTYPE)
    with pytest.raises(NotImplementedError, match="integer class labels"):
        spec.output_factors(out, torch.rand(2, 3, 4, dtype=DTYPE), "type-2")
    with pytest.raises(ValueError, match=r"expected targets \(2, 4\)"):
        spec.output_factors(out, torch.zeros(2, 3, dtype=torch.long), "type-2")
    with pytest.raises(ValueError, match=r"outputs \[N, C, ...\]"):
        spec.output_factors(out[0, :, 0], torch.zeros((), dtype=torch.long), "type-2")
    with pytest.raises(ValueError, match="output shape"):
        make_loss_spec(nn.MSELoss()).output_factors(out, out[:, :2], "type-2")
    with pytest.raises(ValueError, match="'nope' is not a valid FactorKind"):
        spec.output_factors(out, torch.zeros(2, 4, dtype=torch.long), "nope")
    custom = make_loss_spec(nn.L1Loss())
    with pytest.raises(NotImplementedError, match="got L1Loss"):
        custom.output_factors(out, out, "type-2")
    with pytest.raises(NotImplementedError, match="got L1Loss"):
        custom.shared_output_factors(out, out, "mc")
