"""No operator changes the model: BatchNorm in train mode is refused, buffers are restored.

See NOTE [module buffers] in ``curvops.risk.module_state``.
"""

import pytest
import torch
from helpers.operator_zoo import (
    DTYPE,
    OPERATOR_KINDS,
    build_operator,
    classification_batches,
    random_vector,
    seeded,
)
from torch import nn

from curvops import JacobianLinearOperator
from curvops.risk.module_state import row_wise

CHECKS = pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _assert_same_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_buffers())
    assert after.keys() == before.keys()
    for name, b in before.items():
        assert torch.equal(after[name], b), f"buffer {name} changed"


def _use(A) -> None:
    """Multiply with a vector, a matrix and from the left (every pass an operator makes)."""
    A @ random_vector(A)
    A @ torch.ones(A.shape[1], 3, dtype=A.dtype)
    torch.ones(A.shape[0], dtype=A.dtype) @ A
    if hasattr(A, "gradient_and_loss") and not isinstance(A, JacobianLinearOperator):
        A.gradient_and_loss()


def _batchnorm_model() -> nn.Module:
    with seeded(3):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    return model.to(DTYPE)


@CHECKS
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_batchnorm_in_train_mode_is_refused(kind, check):
    model, data = _batchnorm_model().train(), classification_batches()
    before = _buffers(model)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' is in training mode.*model.eval\(\)"):
        build_operator(kind, model, nn.CrossEntropyLoss(), params, data, check_deterministic=check)
    _assert_same_buffers(model, before)
    assert before["1.num_batches_tracked"] == 0
    assert model.training and model[1].training


@CHECKS
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_batchnorm_in_eval_mode_keeps_its_statistics(kind, check):
    model, data = _batchnorm_model().eval(), classification_batches()
    with torch.no_grad():  # non-trivial statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    before = _buffers(model)
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss()
    A = build_operator(kind, model, loss, params, data, check_deterministic=check)
    _use(A)
    _assert_same_buffers(model, before)
    assert not model.training


class RunningInputMean(nn.Module):
    """Tracks a running mean of its inputs in training mode (a buffer updated in place)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=DTYPE))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
            self.steps += 1
        return x


def _tracking_model() -> nn.Module:
    with seeded(4):
        model = nn.Sequential(nn.Linear(3, 4), RunningInputMean(4), nn.Tanh(), nn.Linear(4, 2))
    return model.to(DTYPE).train()


@pytest.mark.parametrize("kind", ["hessian", "kfac", "ekfac"])
def test_buffers_updated_by_plain_forward_passes_are_restored(kind):
    model, data = _tracking_model(), classification_batches()
    before = _buffers(model)
    params = list(model.parameters())
    A = build_operator(kind, model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    v = random_vector(A)
    first = A @ v
    torch.testing.assert_close(A @ v, first, rtol=0, atol=0)
    _assert_same_buffers(model, before)
    assert model.training


@pytest.mark.parametrize("kind", ["ggn", "ef", "mc-fisher", "jacobian"])
def test_buffer_updates_inside_transforms_are_explained(kind):
    model, data = _tracking_model(), classification_batches()
    before = _buffers(model)
    params = list(model.parameters())
    A = build_operator(kind, model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    A @ random_vector(A)  # one column: a plain forward pass with dual tensors
    with pytest.raises(RuntimeError, match="updates a tensor in place.*model.eval"):
        A @ torch.ones(A.shape[1], 2, dtype=A.dtype)  # several columns: torch.func.vmap
    _assert_same_buffers(model, before)
    if kind != "jacobian":  # the determinism check differentiates the loss by torch.func.grad
        with pytest.raises(RuntimeError, match=f"{type(A).__name__}: the model updates a tensor"):
            build_operator(kind, model, nn.CrossEntropyLoss(), params, data)
        _assert_same_buffers(model, before)
    model.eval()
    A = build_operator(kind, model, nn.CrossEntropyLoss(), params, data)
    _use(A)
    _assert_same_buffers(model, before)


# ==================================================================== row-wise models
class BatchCentred(nn.Module):
    """Subtracts the batch mean: output rows depend on other data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(dim=0)


class TanhSubclass(nn.Tanh):
    """A subclass may override ``forward``: never trusted by type."""


@pytest.mark.parametrize(
    "model, expected",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), True),
        (nn.Linear(3, 2), True),
        (nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(3, 2), nn.ReLU())), True),
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5).eval()), True),
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)), False),  # training mode
        (nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(3, 2)), False),
        (nn.Sequential(nn.Linear(3, 4), TanhSubclass()), False),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).eval()), False),
        (BatchCentred(), False),
    ],
)
def test_row_wise_models_are_recognised_by_their_modules(model, expected):
    assert row_wise(model) is expected
    assert row_wise(None) is False


def test_hooks_make_a_model_untrusted():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    handle = model[1].register_forward_hook(lambda m, i, o: o - o.mean(dim=0))
    assert not row_wise(model)
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        assert not row_wise(model)
    finally:
        handle.remove()
    assert row_wise(model)
