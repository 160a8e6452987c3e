"""Loss specifications: PyTorch's own ``"mean"`` normaliser, term masks, Fisher refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import QuarticLoss
from torch import nn

from curvops.losses import (
    BCEWithLogitsLossSpec,
    ClassIndexLossSpec,
    CrossEntropyLossSpec,
    ElementwiseLossSpec,
    LossSpec,
    MSELossSpec,
    make_loss_spec,
)

DTYPE = torch.float64
G = torch.Generator().manual_seed(0)
W = torch.tensor([0.5, 2.0, 1.0], dtype=DTYPE)


def _class_targets(ignore: int = -100):
    y = torch.randint(0, 3, (4, 5), generator=G)
    y[0, :2] = ignore
    y[3, 4] = ignore
    return torch.randn(4, 3, 5, generator=G, dtype=DTYPE), y


def _binary():
    out = torch.randn(4, 5, generator=G, dtype=DTYPE)
    return out, torch.randint(0, 2, (4, 5), generator=G).to(DTYPE)


def _regression():
    out = torch.randn(4, 3, 2, generator=G, dtype=DTYPE)
    return out, torch.randn(4, 3, 2, generator=G, dtype=DTYPE)


PROBLEMS = {
    "ce": (lambda: nn.CrossEntropyLoss(), _class_targets),
    "ce-ignore-7": (lambda: nn.CrossEntropyLoss(ignore_index=7), lambda: _class_targets(7)),
    "ce-weight": (lambda: nn.CrossEntropyLoss(weight=W), _class_targets),
    "ce-weight-smooth": (
        lambda: nn.CrossEntropyLoss(weight=W, label_smoothing=0.2),
        _class_targets,
    ),
    "ce-smooth": (lambda: nn.CrossEntropyLoss(label_smoothing=0.2), _class_targets),
    "ce-probabilities": (
        lambda: nn.CrossEntropyLoss(weight=W),
        lambda: (_class_targets()[0], torch.softmax(torch.randn(4, 3, 5, generator=G), 1)),
    ),
    "nll-weight": (
        lambda: nn.NLLLoss(weight=W),
        lambda: (lambda o, y: (o.log_softmax(1), y))(*_class_targets()),
    ),
    "mse": (lambda: nn.MSELoss(), _regression),
    "l1": (lambda: nn.L1Loss(), _regression),
    "bce-weights": (
        lambda: nn.BCEWithLogitsLoss(weight=torch.rand(5, generator=G, dtype=DTYPE)),
        _binary,
    ),
    "bce-pos-weight": (
        lambda: nn.BCEWithLogitsLoss(pos_weight=3 * torch.rand(5, generator=G, dtype=DTYPE)),
        _binary,
    ),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_normaliser_is_pytorchs_mean_denominator(name):
    """Z_B (from the targets alone) == sum-reduced loss / mean-reduced loss of PyTorch."""
    make_loss, make_data = PROBLEMS[name]
    loss = make_loss()
    out, y = make_data()
    spec = make_loss_spec(loss)
    total = copy.copy(loss)
    total.reduction = "sum"
    assert spec.knows_normaliser
    assert spec.normaliser(y, out.shape[0]) == pytest.approx(float(total(out, y) / loss(out, y)))
    assert spec.reduction_factor(y, 4) == pytest.approx(1 / spec.normaliser(y, 4))


def test_spec_classes():
    assert type(make_loss_spec(nn.CrossEntropyLoss())) is CrossEntropyLossSpec
    assert type(make_loss_spec(nn.MSELoss())) is MSELossSpec
    assert type(make_loss_spec(nn.BCEWithLogitsLoss())) is BCEWithLogitsLossSpec
    assert type(make_loss_spec(nn.NLLLoss())) is ClassIndexLossSpec
    assert type(make_loss_spec(nn.HuberLoss())) is ElementwiseLossSpec
    assert type(make_loss_spec(QuarticLoss("mean"))) is LossSpec

    class Renamed(nn.MSELoss):  # keeps MSELoss.forward: still MSE
        pass

    class Changed(nn.MSELoss):
        def forward(self, output, y):
            return super().forward(2 * output, y)

    assert type(make_loss_spec(Renamed())) is MSELossSpec
    changed = make_loss_spec(Changed())
    assert type(changed) is LossSpec and not changed.supports_fisher
    with pytest.raises(NotImplementedError, match="a subclass of a supported loss"):
        changed.require_fisher("EFLinearOperator")


def test_custom_loss_counts_data_and_reports_entries_per_datum():
    spec = make_loss_spec(QuarticLoss("mean"))
    y = torch.zeros(4, 3, 2)
    assert spec.normaliser(y, 4) == 4.0
    assert spec.terms_per_datum(y, 4) == 6
    assert spec.terms_per_datum({"y": y}, 4) is None  # unknown for non-tensor targets
    assert make_loss_spec(nn.MSELoss()).terms_per_datum(y, 4) is None  # normaliser known
    assert spec.reduction_factor(y, 4) == 0.25
    assert make_loss_spec(QuarticLoss("sum")).reduction_factor(y, 4) == 1.0


def test_term_mask_and_all_ignored_batches():
    spec = make_loss_spec(nn.CrossEntropyLoss(ignore_index=-1))
    y = torch.tensor([[0, -1, 2], [1, 1, -1]])
    assert torch.equal(spec.term_mask(y), y != -1)
    assert spec.term_mask(torch.tensor([[0, 1]])) is None  # nothing ignored
    assert spec.normaliser(torch.full((2, 3), -1), 2) == 0.0
    with pytest.raises(ValueError, match="every loss term is ignored"):
        spec.reduction_factor(torch.full((2, 3), -1), 2)
    assert make_loss_spec(nn.MSELoss()).term_mask(torch.zeros(2, 3)) is None


@pytest.mark.parametrize(
    "loss, match",
    [
        (nn.CrossEntropyLoss(weight=W), "with class weights"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "with weight/pos_weight"),
        (nn.BCEWithLogitsLoss(weight=torch.ones(3)), "with weight/pos_weight"),
        (QuarticLoss("mean"), "got QuarticLoss"),
        (nn.NLLLoss(), "got NLLLoss"),
    ],
)
def test_fisher_refusals(loss, match):
    spec = make_loss_spec(loss)
    assert not spec.supports_fisher
    with pytest.raises(NotImplementedError, match=match):
        spec.require_fisher("FisherMCLinearOperator")


def test_label_smoothing_and_ignore_index_support_fisher():
    for loss in (nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(ignore_index=3)):
        assert make_loss_spec(loss).supports_fisher
