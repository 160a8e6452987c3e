"""Random small problems for the property-based suite (``tests/properties``).

A :class:`Problem` is a float64 model, a loss and *groups* of data: every group holds
``N_g`` data of one sequence length ``T_g`` (lengths differ between groups, ``T_g = 0`` is
allowed for the position-wise sequence models). A *split* cuts every group into batches of
sizes ``1..N_g`` (uneven); two splits of the same problem describe the same data set, so
every curvature matrix must be the same for both (the batch-split invariance of NOTE [risk
scaling] in :mod:`curvops.testing.dense`). For cross-entropy, targets are randomly
``ignore_index`` (padding), and :meth:`Problem.padded_batches` merges the groups of a
position-wise sequence model (``"seq"``, ``"lm"``) into one batch padded to the longest
length with ``ignore_index`` targets (and random inputs at the padded positions), which must
give the same matrices as the unpadded groups because that model acts position-wise.

The strategy :func:`problems` draws the architecture, the loss, the reduction, the sizes and a
seed; everything random is built from that seed without touching the global RNG.

Architectures:

* ``"mlp"``: ``Linear-Tanh-Linear`` on ``[N, F]`` (outputs ``[N, C]``).
* ``"seq"``: the same MLP acting on every position of ``[N, T, F]`` (outputs ``[N, T, C]``;
  cross-entropy gets them as ``[N, C, T]``).
* ``"lm"``: ``Embedding-Tanh-Linear`` on token ids ``[N, T]`` (a tiny language model;
  outputs ``[N, T, C]``, ``[N, C, T]`` for cross-entropy; position-wise).
* ``"cnn"``: ``Conv1d(k=2, padding=1)-Tanh-Conv1d(k=1)`` on ``[N, F, T]`` (outputs
  ``[N, C, T + 1]``; not position-wise).
* ``"cnn-flat"``: ``Conv1d(k=2)-Tanh-Flatten-Linear`` on ``[N, F, 3]`` (outputs ``[N, C]``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

DTYPE = torch.float64
IGNORE = -100
ARCHS = ("mlp", "seq", "lm", "cnn", "cnn-flat")
POSITION_WISE = ("seq", "lm")
VOCAB = 5
LOSSES = ("mse", "ce", "bce")
REDUCTIONS = ("mean", "sum")


class ChannelsFirst(nn.Module):
    """``[N, T, C]`` to ``[N, C, T]``, the class axis ``CrossEntropyLoss`` expects."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


@dataclass
class Problem:
    """A random problem (see the module docstring).

    Attributes:
        arch: Architecture name.
        loss_name: ``"mse"``, ``"ce"`` or ``"bce"``.
        reduction: ``"mean"`` or ``"sum"``.
        model: The float64 model (eval mode).
        loss_func: The loss module.
        groups: ``(X_g, y_g)`` per group (one sequence length each).
        split_a: Batch sizes per group of the first split.
        split_b: Batch sizes per group of the second split.
        seed: The seed everything was built from.
    """

    arch: str
    loss_name: str
    reduction: str
    model: nn.Module
    loss_func: nn.Module
    groups: list[tuple[Tensor, Tensor]]
    split_a: list[list[int]]
    split_b: list[list[int]]
    seed: int
    lengths: list[int] = field(default_factory=list)

    @property
    def params(self) -> list[Tensor]:
        """The model's parameters."""
        return list(self.model.parameters())

    @property
    def position_wise(self) -> bool:
        """Whether the model acts on every sequence position separately."""
        return self.arch in POSITION_WISE

    def batches(self, split: list[list[int]]) -> list[tuple[Tensor, Tensor]]:
        """The data cut into batches of the given sizes, group by group."""
        out = []
        for (X, y), sizes in zip(self.groups, split):
            start = 0
            for n in sizes:
                out.append((X[start : start + n], y[start : start + n]))
                start += n
        return out

    def whole(self) -> list[tuple[Tensor, Tensor]]:
        """One batch per group."""
        return [(X, y) for X, y in self.groups]

    def padded_batches(self) -> list[tuple[Tensor, Tensor]]:
        """All groups in one batch, padded to the longest length (position-wise + ``"ce"``).

        Padded positions get random inputs and ``ignore_index`` targets.
        """
        assert self.position_wise and self.loss_name == "ce"
        T_max = max(X.shape[1] for X, _ in self.groups)
        gen = torch.Generator().manual_seed(self.seed + 1)
        Xs, ys = [], []
        for X, y in self.groups:
            N, T = X.shape[:2]
            if X.is_floating_point():
                pad_X = torch.randn(N, T_max - T, X.shape[2], generator=gen, dtype=X.dtype)
            else:
                pad_X = torch.randint(0, VOCAB, (N, T_max - T), generator=gen)
            pad_y = torch.full((N, T_max - T), IGNORE, dtype=y.dtype)
            Xs.append(torch.cat([X, pad_X], dim=1))
            ys.append(torch.cat([y, pad_y], dim=1))
        return [(torch.cat(Xs), torch.cat(ys))]

    def converted(self, dtype: torch.dtype) -> Problem:
        """A copy of the problem with model and floating data in ``dtype``."""
        model = copy.deepcopy(self.model).to(dtype)

        def conv(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        groups = [(conv(X), conv(y)) for X, y in self.groups]
        return Problem(
            self.arch,
            self.loss_name,
            self.reduction,
            model,
            copy.deepcopy(self.loss_func),
            groups,
            self.split_a,
            self.split_b,
            self.seed,
            self.lengths,
        )


def _model(arch: str, F: int, H: int, C: int, loss_name: str) -> nn.Module:
    if arch == "mlp":
        return nn.Sequential(nn.Linear(F, H), nn.Tanh(), nn.Linear(H, C))
    if arch == "seq":
        layers = [nn.Linear(F, H), nn.Tanh(), nn.Linear(H, C)]
        if loss_name == "ce":
            layers.append(ChannelsFirst())
        return nn.Sequential(*layers)
    if arch == "lm":
        layers = [nn.Embedding(VOCAB, F), nn.Tanh(), nn.Linear(F, C)]
        if loss_name == "ce":
            layers.append(ChannelsFirst())
        return nn.Sequential(*layers)
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv1d(F, H, kernel_size=2, padding=1), nn.Tanh(), nn.Conv1d(H, C, kernel_size=1)
        )
    assert arch == "cnn-flat"
    return nn.Sequential(nn.Conv1d(F, 2, kernel_size=2), nn.Tanh(), nn.Flatten(), nn.Linear(4, C))


def _inputs(arch: str, N: int, T: int, F: int, gen: torch.Generator) -> Tensor:
    if arch == "mlp":
        return torch.randn(N, F, generator=gen, dtype=DTYPE)
    if arch == "seq":
        return torch.randn(N, T, F, generator=gen, dtype=DTYPE)
    if arch == "lm":
        return torch.randint(0, VOCAB, (N, T), generator=gen)
    return torch.randn(N, F, T, generator=gen, dtype=DTYPE)  # channels first


def _targets(
    loss_name: str, output_shape: tuple[int, ...], gen: torch.Generator, ignore_rate: float
) -> Tensor:
    if loss_name == "mse":
        return torch.randn(output_shape, generator=gen, dtype=DTYPE)
    if loss_name == "bce":
        return torch.randint(0, 2, output_shape, generator=gen).to(DTYPE)
    C = output_shape[1]
    shape = (output_shape[0], *output_shape[2:])
    y = torch.randint(0, C, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignore_rate
    return torch.where(ignored, torch.full_like(y, IGNORE), y)


def _splits(draw: Callable, N: int) -> list[int]:
    """Random batch sizes ``1..N`` summing to ``N``."""
    sizes, left = [], N
    while left > 0:
        n = draw(st.integers(1, left))
        sizes.append(n)
        left -= n
    return sizes


@st.composite
def problems(
    draw: Callable,
    archs: tuple[str, ...] = ARCHS,
    losses: tuple[str, ...] = LOSSES,
    reductions: tuple[str, ...] = REDUCTIONS,
    max_groups: int = 3,
    max_group_size: int = 4,
) -> Problem:
    """Strategy: a random :class:`Problem`."""
    arch = draw(st.sampled_from(archs))
    loss_name = draw(st.sampled_from(losses))
    reduction = draw(st.sampled_from(reductions))
    seed = draw(st.integers(0, 2**31 - 1))
    F, H, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 3))
    num_groups = draw(st.integers(1, max_groups)) if arch in ("seq", "lm", "cnn") else 1
    sizes = [draw(st.integers(1, max_group_size)) for _ in range(num_groups)]
    if arch in POSITION_WISE:
        lengths = [draw(st.integers(0, 3)) for _ in range(num_groups)]
        if max(lengths) == 0:
            lengths[0] = 1  # some loss term
    elif arch == "cnn":
        lengths = [draw(st.integers(1, 3)) for _ in range(num_groups)]
    else:
        lengths = [3] * num_groups
    ignore_rate = draw(st.sampled_from([0.0, 0.3, 0.7])) if loss_name == "ce" else 0.0
    split_a = [_splits(draw, n) for n in sizes]
    split_b = [_splits(draw, n) for n in sizes]
    losses_ = {
        "mse": lambda: nn.MSELoss(reduction=reduction),
        "ce": lambda: nn.CrossEntropyLoss(reduction=reduction, ignore_index=IGNORE),
        "bce": lambda: nn.BCEWithLogitsLoss(reduction=reduction),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model(arch, F, H, C, loss_name).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for N, T in zip(sizes, lengths):
        X = _inputs(arch, N, T, F, gen)
        with torch.no_grad():
            out_shape = tuple(model(X).shape)
        groups.append((X, _targets(loss_name, out_shape, gen, ignore_rate)))
    if loss_name == "ce" and not any(bool((y != IGNORE).any()) for _, y in groups):
        # at least one counting loss term, or the mean is undefined
        i = next(i for i, (_, y) in enumerate(groups) if y.numel())
        y = groups[i][1].clone()
        y.view(-1)[0] = 0
        groups[i] = (groups[i][0], y)
    return Problem(
        arch,
        loss_name,
        reduction,
        model,
        losses_[loss_name](),
        groups,
        split_a,
        split_b,
        seed,
        lengths,
    )


def rel_error(A: Tensor, B: Tensor) -> float:
    """``max |A - B| / max(max |B|, tiny)``, the error relative to the largest entry."""
    scale = B.abs().max().clamp_min(torch.finfo(B.dtype).tiny)
    return float((A - B).abs().max() / scale)


def flat(tensors: list[Tensor] | Any) -> Tensor:
    """Concatenate a tensor list into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])
