"""NOTE [batch weights]: batch weights from PyTorch's loss normalisers, counted once."""

from __future__ import annotations

import pytest
import torch
from cases import QuarticLoss, make_case
from torch import nn

from curvops import GGNLinearOperator, HessianLinearOperator
from curvops.risk import EmpiricalRisk


def _risk(case, **kwargs):
    return EmpiricalRisk(case.model_func, case.loss_func, case.params, case.data, **kwargs)


def test_weights_are_normaliser_shares_and_empty_batches_are_skipped():
    case = make_case("seq-ce-padded-mean")
    risk = _risk(case)
    counts = [int((y != -100).sum()) for _, y in case.data]  # [10, 3, 0, 11]
    assert counts[2] == 0
    assert risk.normaliser == sum(counts) and risk.num_data == 12
    batches = list(risk.batches())
    assert len(batches) == 3  # the all-padding batch contributes nothing
    assert [b.weight for b in batches] == pytest.approx([c / sum(counts) for c in counts if c])


def test_class_weight_normaliser_and_sum_reduction():
    case = make_case("mlp-ce-weighted-mean")
    w = case.loss_func.weight
    sums = [float(w[y[y != -100]].sum()) for _, y in case.data]
    risk = _risk(case)
    assert risk.normaliser == pytest.approx(sum(sums))
    assert [b.weight for b in risk.batches()] == pytest.approx([s / sum(sums) for s in sums])
    case.loss_func.reduction = "sum"
    assert [b.weight for b in _risk(case).batches()] == [1.0, 1.0, 1.0]


def test_normaliser_is_counted_even_with_num_data():
    case = make_case("seq-ce-varlen-mean")
    risk = _risk(case, num_data=12)
    assert risk.normaliser == sum(y.numel() for _, y in case.data)


def test_everything_ignored_is_an_error():
    case = make_case("seq-ce-padded-mean")
    data = [(X, torch.full_like(y, -100)) for X, y in case.data]
    with pytest.raises(ValueError, match="every loss term of the data is ignored"):
        GGNLinearOperator(case.model_func, case.loss_func, case.params, data)


def test_custom_mean_loss_needs_equal_terms_per_datum():
    case = make_case("seq-mse-varlen-mean")
    args = (case.model_func, QuarticLoss("mean"), case.params, case.data)
    with pytest.raises(ValueError, match=r"the targets have \[2, 4, 8\] entries per datum"):
        HessianLinearOperator(*args)
    # with reduction="sum" (and any scaling the user applies) it is exact
    HessianLinearOperator(case.model_func, QuarticLoss("sum"), case.params, case.data)


def test_changing_targets_between_passes_is_an_error():
    case = make_case("seq-ce-padded-mean")

    class Shrinking(list):
        """Yields one more ignored target every pass (e.g. random target masking)."""

        passes = 0

        def __iter__(self):
            Shrinking.passes += 1
            for X, y in list.__iter__(self):
                y = y.clone()
                y.view(-1)[: Shrinking.passes] = -100
                yield X, y

    G = GGNLinearOperator(
        case.model_func,
        case.loss_func,
        case.params,
        Shrinking(case.data),
        check_deterministic=False,
    )
    with pytest.raises(ValueError, match="the data changed between passes"):
        G @ torch.zeros(G.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")])
def test_only_mean_reductions_pass_over_the_targets(loss):
    """Without a 'mean' normaliser to count, num_data avoids the pass over the data."""
    case = make_case("mlp-ce-mean")

    class Counting(list):
        passes = 0

        def __iter__(self):
            Counting.passes += 1
            return list.__iter__(self)

    data = Counting(case.data)
    EmpiricalRisk(case.model_func, loss, case.params, data, num_data=12)
    # iter() is called once to validate the data; the mean counts its normaliser too
    assert Counting.passes == (2 if loss.reduction == "mean" else 1)
