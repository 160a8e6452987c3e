"""The benchmark problems: model, loss, parameters and data, built from a fixed seed.

CPU problems are sized so that one gradient takes tens of milliseconds on two cores; the
CUDA-only problems are those of the paper's Fig. 3 (ResNet-50 on 224x224 images, batch 64;
a 124 M-parameter GPT, batch 4, context 1024). Data are random (the cost does not depend on
the values). Every problem has two batches except the CUDA ones (one batch), so the data loop
of the operators is exercised; the gradient reference uses the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.models import GPT, BasicBlock, ResNet, SmallCNN, mlp, resnet50


@dataclass
class Problem:
    """A benchmark problem.

    Attributes:
        name: Registry key.
        description: One line for the results table.
        model: The model (``eval()`` mode, on the device).
        loss_func: The loss module.
        data: List of ``(X, y)`` batches on the device.
        params: All trainable parameters (exact operators, gradient).
        kfac_params: Parameters of the ``nn.Linear`` / ``nn.Conv2d`` layers (KFAC; other
            layers such as normalisation and embeddings are left out in both libraries).
        num_classes: Number of classes of the cross-entropy loss.
    """

    name: str
    description: str
    model: nn.Module
    loss_func: nn.Module
    data: list[tuple[Tensor, Tensor]]
    params: list[Tensor]
    kfac_params: list[Tensor]
    num_classes: int

    @property
    def num_params(self) -> int:
        """Number of parameters of the exact operators."""
        return sum(p.numel() for p in self.params)

    @property
    def num_data(self) -> int:
        """Number of data over all batches."""
        return sum(X.shape[0] for X, _ in self.data)


def _kfac_params(model: nn.Module) -> list[Tensor]:
    out = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out += [p for p in (module.weight, module.bias) if p is not None]
    return out


def _images(batches: int, n: int, channels: int, side: int, classes: int):
    return [
        (torch.randn(n, channels, side, side), torch.randint(0, classes, (n,)))
        for _ in range(batches)
    ]


def _tokens(batches: int, n: int, context: int, vocab: int):
    out = []
    for _ in range(batches):
        seq = torch.randint(0, vocab, (n, context + 1))
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].reshape(-1)))
    return out


def _mlp(quick: bool):
    width = 64 if quick else 512
    model = mlp([784, width, width, 10])
    data = [
        (torch.randn(n, 784), torch.randint(0, 10, (n,)))
        for n in ((16, 16) if quick else (256,) * 2)
    ]
    return model, data, f"MLP 784-{width}-{width}-10, ReLU", 10


def _mlp_small(quick: bool):
    model = mlp([64, 32, 10])  # D = 2,410: small enough for to_dense()
    data = [(torch.randn(128, 64), torch.randint(0, 10, (128,)))]
    return model, data, "MLP 64-32-10, ReLU, 128 data (the diagonal vs. to_dense())", 10


def _cnn(quick: bool):
    width, n = (4, 8) if quick else (16, 64)
    model = SmallCNN(3, width, 32, 64 if quick else 128, 10)
    desc = f"CNN 2x(conv3x3-ReLU-pool) {width}/{2 * width} ch + MLP head, 3x32x32"
    return model, _images(2, n, 3, 32, 10), desc, 10


def _resnet(quick: bool):
    widths, n = ([4, 8, 16], 4) if quick else ([16, 32, 64], 32)
    model = ResNet(BasicBlock, [1, 1, 1], widths, 10)
    desc = f"ResNet (3 basic blocks, {'/'.join(map(str, widths))} ch, BatchNorm eval), 3x32x32"
    return model, _images(2, n, 3, 32, 10), desc, 10


def _gpt(quick: bool):
    vocab, context, dim, heads, layers, n = (
        (32, 16, 32, 2, 1, 2) if quick else (256, 64, 128, 4, 2, 8)
    )
    model = GPT(vocab, context, dim, heads, layers)
    desc = f"GPT {layers} blocks, d={dim}, {heads} heads, ctx {context}, vocab {vocab} (SDPA)"
    return model, _tokens(2, n, context, vocab), desc, vocab


def _resnet50(quick: bool):
    model = resnet50(1000)
    return model, _images(1, 64, 3, 224, 1000), "ResNet-50, 3x224x224, batch 64", 1000


def _gpt124m(quick: bool):
    model = GPT(50304, 1024, 768, 12, 12)
    desc = "GPT 124M (12 blocks, d=768, 12 heads), ctx 1024, batch 4 (SDPA)"
    return model, _tokens(1, 4, 1024, 50304), desc, 50304


_BUILDERS: dict[str, Callable[[bool], tuple]] = {
    "mlp": _mlp,
    "mlp-small": _mlp_small,
    "cnn": _cnn,
    "resnet": _resnet,
    "gpt": _gpt,
    "resnet50": _resnet50,
    "gpt124m": _gpt124m,
}
CPU_PROBLEMS = ["mlp", "cnn", "resnet", "gpt"]
CUDA_ONLY_PROBLEMS = ["resnet50", "gpt124m"]


def problem_names() -> list[str]:
    """All problem names."""
    return list(_BUILDERS)


def make_problem(
    name: str, device: str | torch.device = "cpu", *, quick: bool = False, seed: int = 0
) -> Problem:
    """Build a problem from a fixed seed without touching the caller's global RNG state.

    Args:
        name: A name from :func:`problem_names`.
        device: Device of model and data.
        quick: Tiny sizes of the CPU problems (for smoke tests of the suite itself).
        seed: Seed of model initialisation and data.

    Returns:
        The problem, model in ``eval()`` mode, float32.

    Raises:
        KeyError: For an unknown name.
        ValueError: For a CUDA-only problem on a CPU device.
    """
    if name not in _BUILDERS:
        raise KeyError(f"Unknown problem {name!r}; choose from {', '.join(_BUILDERS)}.")
    device = torch.device(device)
    if name in CUDA_ONLY_PROBLEMS and device.type != "cuda":
        raise ValueError(f"Problem {name!r} is sized for a GPU; run it with --device cuda.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, data, description, classes = _BUILDERS[name](quick)
    model = model.to(device).eval()
    data = [(X.to(device), y.to(device)) for X, y in data]
    return Problem(
        name=name,
        description=description,
        model=model,
        loss_func=nn.CrossEntropyLoss(),
        data=data,
        params=[p for p in model.parameters() if p.requires_grad],
        kfac_params=_kfac_params(model),
        num_classes=classes,
    )
