"""Small neural nets for the tour and the examples, built reproducibly.

The tour's CNN follows the paper's Fig. 2: three convolutions and one dense layer with ReLU
and sigmoid activations, small enough (:math:`D = 720`) for dense curvature matrices.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with a fixed initialisation without touching the global RNG.

    Args:
        factory: Builds the model (draws its initial weights from the global RNG).
        seed: Seed of the initialisation.

    Returns:
        The model; the global RNG state is the same as before the call.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def make_digits_cnn(
    *, channels: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """The tour's CNN for ``[N, 1, 8, 8]`` digits: three convolutions and one dense layer.

    ``conv(1->c, 3x3) - ReLU - conv(c->c, 3x3, stride 2) - ReLU - conv(c->c, 3x3, stride 2) -
    Sigmoid - Linear(4c -> 10)``; with ``c = 5`` it has :math:`D = 720` parameters.

    Args:
        channels: Channels of every convolution.
        seed: Seed of the initialisation.
        dtype: Parameter data type.

    Returns:
        The model, on the CPU (move it with ``.to(device)``).
    """

    def build() -> nn.Sequential:
        c = channels
        layers = [
            ("conv1", nn.Conv2d(1, c, 3, padding=1)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(c, c, 3, stride=2, padding=1)),
            ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(c, c, 3, stride=2, padding=1)),
            ("sigmoid", nn.Sigmoid()),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(4 * c, 10)),
        ]
        return nn.Sequential(OrderedDict(layers)).to(dtype)

    return seeded(build, seed)


def make_digits_mlp(
    *,
    hidden: int = 16,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """A one-hidden-layer tanh MLP for ``[N, 1, 8, 8]`` digits.

    Args:
        hidden: Width of the hidden layer.
        num_classes: Number of outputs.
        seed: Seed of the initialisation.
        dtype: Parameter data type.

    Returns:
        The model, on the CPU.
    """

    def build() -> nn.Sequential:
        layers = [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64, hidden)),
            ("tanh", nn.Tanh()),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]
        return nn.Sequential(OrderedDict(layers)).to(dtype)

    return seeded(build, seed)


def layer_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """Name and number of trainable parameters of each layer (module owning parameters).

    Args:
        model: The model.

    Returns:
        ``(module name, number of parameters)`` in the order of ``model.parameters()``.
    """
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            layer = name.rsplit(".", 1)[0] if "." in name else name
            sizes[layer] = sizes.get(layer, 0) + p.numel()
    return list(sizes.items())
