"""A short, reproducible training loop used by the tour and the examples."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import nn
from tqdm.auto import tqdm

from curvops.cli.data import Batches


class Optimizer(str, Enum):
    """Optimizers of :func:`train`.

    Attributes:
        ADAM: Adam (Kingma, D. P., Ba, J. (2015). Adam: A Method for Stochastic Optimization).
        SGD: Plain stochastic gradient descent.
    """

    ADAM = "adam"
    SGD = "sgd"


def train(
    model: nn.Module,
    loss_func: nn.Module,
    batches: Batches,
    *,
    epochs: int,
    lr: float = 1e-2,
    optimizer: str | Optimizer = Optimizer.ADAM,
    progressbar: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place over ``batches`` (in their given order).

    Args:
        model: The model to train (its parameters are updated in place; its ``.grad``
            fields are reset to ``None`` at the end).
        loss_func: The loss.
        batches: Training batches, visited in order every epoch (deterministic).
        epochs: Number of passes over ``batches``.
        lr: Learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        progressbar: Show a progress bar over epochs.
        on_epoch: Called as ``on_epoch(epoch, mean_loss)`` after each epoch (counting from 1),
            e.g. to drive an outer progress bar.

    Returns:
        The mean training loss of every epoch.

    Raises:
        ValueError: If ``epochs`` is negative or the optimizer is unknown.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}.")
    try:
        optimizer = Optimizer(optimizer)
    except ValueError:
        raise ValueError(f"Unknown optimizer={optimizer!r}. Use 'adam' or 'sgd'.") from None
    params = [p for p in model.parameters() if p.requires_grad]
    opt_class = torch.optim.Adam if optimizer == Optimizer.ADAM else torch.optim.SGD
    opt = opt_class(params, lr=lr)
    history = []
    for epoch in tqdm(range(epochs), desc="training", disable=not progressbar, leave=False):
        total, count = 0.0, 0
        for X, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_func(model(X), y)
            loss.backward()
            opt.step()
            total += loss.item() * X.shape[0]
            count += X.shape[0]
        history.append(total / count)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    for p in params:
        p.grad = None
    return history
