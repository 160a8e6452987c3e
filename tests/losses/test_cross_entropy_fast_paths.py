"""The cross-entropy's fast paths (NOTE [softmax over few classes]) give the same numbers."""

import pytest
import torch
from torch import nn
from torch.nn.functional import one_hot

from curvops.losses.cross_entropy import loss_value
from curvops.losses.factory import make_loss_spec


def _reference_term_gradients(output, y, ignore_index, eps=0.0):
    C = output.shape[1]
    keep = y != ignore_index
    target = one_hot(torch.where(keep, y, 0), C).movedim(-1, 1).to(output.dtype)
    target = target * keep.unsqueeze(1)
    target = (1 - eps) * target + eps / C if eps else target
    return output.softmax(dim=1) - target


@pytest.mark.parametrize("classes", [2, 10, 32, 33, 100])
@pytest.mark.parametrize("positions", [(), (3,)], ids=["vectors", "sequences"])
@pytest.mark.parametrize("ignore_index", [-100, -1, 1], ids=["default", "minus-one", "a-class"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["plain", "smoothed"])
def test_term_gradients_match_softmax_minus_one_hot(classes, positions, ignore_index, eps):
    gen = torch.Generator().manual_seed(classes)
    output = torch.randn(7, classes, *positions, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (7, *positions), generator=gen)
    spec = make_loss_spec(nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=eps))
    expected_all = _reference_term_gradients(output, y, ignore_index, eps)
    torch.testing.assert_close(spec.term_gradients(output, y), expected_all)
    y_ignored = y.clone()
    y_ignored.view(-1)[::3] = ignore_index
    expected = _reference_term_gradients(output, y_ignored, ignore_index, eps)
    torch.testing.assert_close(spec.term_gradients(output, y_ignored), expected)


def test_term_mask_follows_in_place_changes_of_the_targets():
    spec = make_loss_spec(nn.CrossEntropyLoss())
    y = torch.tensor([0, 1, 2, 1])
    assert spec.term_mask(y) is None
    y[1] = -100  # the same tensor, changed in place: a new mask, not the remembered one
    assert torch.equal(spec.term_mask(y), torch.tensor([True, False, True, True]))
    assert spec.term_mask(torch.tensor([0, 1])) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "loss_func, shape",
    [
        (nn.CrossEntropyLoss(reduction="sum"), (40, 10)),  # the fast path
        (nn.CrossEntropyLoss(reduction="sum"), (40, 100)),  # many classes: the loss itself
        (nn.CrossEntropyLoss(reduction="sum"), (8, 10, 5)),  # sequences
        (nn.CrossEntropyLoss(), (40, 10)),
        (nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.2), (40, 10)),
        (nn.CrossEntropyLoss(reduction="sum", weight=torch.rand(10) + 0.5), (40, 10)),
    ],
    ids=["few-classes", "many-classes", "sequences", "mean", "smoothed", "weighted"],
)
def test_loss_value_equals_the_loss(loss_func, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    if loss_func.weight is not None:
        loss_func.weight = loss_func.weight.to(dtype)
    value = loss_value(loss_func, output, y)
    assert value.grad_fn is None
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(value, loss_func(output, y).detach(), **tol)
    y_ignored = y.clone()
    y_ignored.view(-1)[::4] = -100
    torch.testing.assert_close(
        loss_value(loss_func, output, y_ignored), loss_func(output, y_ignored).detach(), **tol
    )


def test_loss_value_of_other_losses_is_the_loss():
    output, target = torch.randn(6, 2), torch.randn(6, 2)
    mse = nn.MSELoss(reduction="sum")
    assert torch.equal(loss_value(mse, output, target), mse(output, target))
