import pytest
import torch
from torch import nn

from curvops.cli.data import load_digits_tensors, make_batches
from curvops.cli.models import make_digits_mlp
from curvops.cli.training import train


@pytest.mark.parametrize("optimizer, lr", [("adam", 3e-2), ("sgd", 0.5)])
def test_train_decreases_the_loss_and_clears_grads(optimizer, lr):
    X, y = load_digits_tensors(num_data=128, generator=torch.Generator().manual_seed(0))
    model = make_digits_mlp(hidden=8)
    calls = []
    history = train(
        model,
        nn.CrossEntropyLoss(),
        make_batches(X, y, 32),
        epochs=5,
        lr=lr,
        optimizer=optimizer,
        on_epoch=lambda epoch, loss: calls.append((epoch, loss)),
    )
    assert len(history) == 5 and history[-1] < 0.8 * history[0]
    assert calls == list(zip(range(1, 6), history))
    assert all(p.grad is None for p in model.parameters())


def test_train_errors():
    model = make_digits_mlp(hidden=2)
    with pytest.raises(ValueError, match="epochs must be non-negative, got -1"):
        train(model, nn.CrossEntropyLoss(), [], epochs=-1)
    with pytest.raises(ValueError, match="Unknown optimizer='lbfgs'. Use 'adam' or 'sgd'"):
        train(model, nn.CrossEntropyLoss(), [], epochs=1, optimizer="lbfgs")
