"""Registry of test problems shared by every curvature test.

Each factory returns a fresh :class:`Case` (new modules, tensors and data) built from a fixed
seed in float64, without touching the global RNG state. Tests parametrize over
:func:`case_ids` (or a subset such as :data:`FISHER_CASES`) and build the problem with
:func:`make_case`. Known limitations belong in ``Case.notes`` / the flags, not in ``if``s
inside tests.

Use from a test file (``tests/`` is on ``sys.path`` through ``tests/conftest.py``)::

    from cases import FISHER_CASES, make_case

or the fixtures ``case`` / ``fisher_case`` of ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

DTYPE = torch.float64
BATCH_SIZES = (4, 3, 5)  # uneven batches, N = 12


@dataclass
class Case:
    """A test problem: model, loss, parameters and batched data.

    Attributes:
        name: Registry key.
        model_func: ``nn.Module`` or callable ``(params, X) -> output``.
        loss_func: Loss module with ``reduction`` ``"mean"`` or ``"sum"``.
        params: The parameters to differentiate (list or dict name -> tensor).
        data: List of batches ``(X, y)``.
        batch_size_fn: Maps ``X`` to its batch size (for non-tensor inputs).
        supports_fisher: Whether MC/empirical/exact Fisher apply (False for custom losses).
        notes: Known limitations of the case.
    """

    name: str
    model_func: nn.Module | Callable
    loss_func: nn.Module
    params: list[Tensor] | dict[str, Tensor]
    data: list[tuple[Any, Tensor]]
    batch_size_fn: Callable | None = None
    supports_fisher: bool = True
    notes: str = ""

    @property
    def num_data(self) -> int:
        """Total number of data over all batches."""
        fn = self.batch_size_fn or (lambda X: X.shape[0])
        return sum(int(fn(X)) for X, _ in self.data)

    @property
    def param_list(self) -> list[Tensor]:
        """The parameters as a list, in the case's order."""
        return list(self.params.values()) if isinstance(self.params, dict) else list(self.params)

    @property
    def dim(self) -> int:
        """Number of parameters D."""
        return sum(p.numel() for p in self.param_list)

    @property
    def same_shapes(self) -> bool:
        """Whether all batches share their non-batch shapes (so they can be concatenated)."""

        def shapes(t):
            return {k: v.shape[1:] for k, v in t.items()} if isinstance(t, dict) else t.shape[1:]

        first_X, first_y = self.data[0]
        return all(
            shapes(X) == shapes(first_X) and shapes(y) == shapes(first_y) for X, y in self.data
        )


# ==================================================================== building blocks
class QuarticLoss(nn.Module):
    r"""Custom twice-differentiable loss :math:`\frac{1}{2} \sum (f - y)^4` (or its mean).

    Not a negative log-likelihood curvops knows, so Fisher-type matrices do not apply.
    """

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output: Tensor, y: Tensor) -> Tensor:
        terms = 0.5 * (output - y) ** 4
        return terms.sum() if self.reduction == "sum" else terms.mean()


class ToChannelsFirst(nn.Module):
    """Permute ``[N, T, C]`` to ``[N, C, T]`` (the class axis CrossEntropyLoss expects)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 1)


class DictInputMLP(nn.Module):
    """MLP reading its input from ``X["x"]``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.net = _mlp(d_in, d_hidden, d_out)

    def forward(self, X: dict[str, Tensor]) -> Tensor:
        return self.net(X["x"])


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def _functional_mlp(params: dict[str, Tensor], X: Tensor) -> Tensor:
    """Linear-Tanh-Linear as a plain function of a parameter dict."""
    h = torch.tanh(X @ params["w1"].T + params["b1"])
    return h @ params["w2"].T + params["b2"]


def _seeded(seed: int, build: Callable[[], Case]) -> Case:
    """Run ``build`` with the global RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        case = build()
    if isinstance(case.model_func, nn.Module):
        case.model_func.to(DTYPE).eval()
    return case


def _targets(loss: str, shape: tuple[int, ...], num_classes: int) -> Tensor:
    """Random targets: regression values, class indices or binary labels."""
    if loss == "mse":
        return torch.randn(*shape, dtype=DTYPE)
    if loss == "ce":
        return torch.randint(0, num_classes, shape)
    return torch.randint(0, 2, shape).to(DTYPE)


_LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


# ==================================================================== factories
def _mlp_case(loss: str, reduction: str) -> Callable[[], Case]:
    d_in, d_hidden, d_out = 3, 6, 3  # D = 45

    def build() -> Case:
        model = _mlp(d_in, d_hidden, d_out)
        data = []
        for n in BATCH_SIZES:
            X = torch.randn(n, d_in, dtype=DTYPE)
            y = _targets(loss, (n, d_out) if loss != "ce" else (n,), d_out)
            data.append((X, y))
        return Case(
            name=f"mlp-{loss}-{reduction}",
            model_func=model,
            loss_func=_LOSSES[loss](reduction=reduction),
            params=list(model.parameters()),
            data=data,
        )

    return build


def _cnn_ce_mean() -> Case:
    # 1x6x6 -> conv3 -> 2x4x4 -> relu -> maxpool2 -> 2x2x2 -> flatten -> linear(8, 3); D = 47
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    data = [(torch.randn(n, 1, 6, 6, dtype=DTYPE), torch.randint(0, 3, (n,))) for n in (3, 2, 4)]
    return Case(
        name="cnn-ce-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(),
        params=list(model.parameters()),
        data=data,
        notes="ReLU and max-pooling are piecewise linear: the net's second derivatives vanish "
        "almost everywhere, so the Hessian differs from the GGN only through the loss.",
    )


def _seq_ce_mean() -> Case:
    # [N, T=3, F=3] -> linear(3, 4) -> tanh -> linear(4, 3) -> [N, C=3, T=3]; D = 31
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), ToChannelsFirst())
    data = [(torch.randn(n, 3, 3, dtype=DTYPE), torch.randint(0, 3, (n, 3))) for n in (2, 1, 3)]
    return Case(
        name="seq-ce-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(),
        params=list(model.parameters()),
        data=data,
        notes="Linear weight sharing over T=3 positions (the 'expand' setting of Eschenhagen et "
        "al. (2023)): 'mean' averages over N*T terms; a datum's loss sums its T positions.",
    )


def _dict_input_mse_mean() -> Case:
    model = DictInputMLP(3, 5, 2)  # D = 32
    data = [
        ({"x": torch.randn(n, 3, dtype=DTYPE)}, torch.randn(n, 2, dtype=DTYPE)) for n in BATCH_SIZES
    ]
    return Case(
        name="dict-input-mse-mean",
        model_func=model,
        loss_func=nn.MSELoss(),
        params=dict(model.named_parameters()),
        data=data,
        batch_size_fn=lambda X: X["x"].shape[0],
        notes="Inputs are dicts {'x': tensor}: needs batch_size_fn.",
    )


def _functional_ce_sum() -> Case:
    params = {
        "w1": torch.randn(4, 3, dtype=DTYPE),
        "b1": torch.randn(4, dtype=DTYPE),
        "w2": torch.randn(3, 4, dtype=DTYPE),
        "b2": torch.randn(3, dtype=DTYPE),
    }  # D = 31
    for p in params.values():
        p.requires_grad_(True)
    data = [(torch.randn(n, 3, dtype=DTYPE), torch.randint(0, 3, (n,))) for n in BATCH_SIZES]
    return Case(
        name="functional-ce-sum",
        model_func=_functional_mlp,
        loss_func=nn.CrossEntropyLoss(reduction="sum"),
        params=params,
        data=data,
        notes="model_func is a plain function (params_dict, X) -> output; no nn.Module, so "
        "module-based structure (KFAC layer detection) does not apply.",
    )


def _subset_shuffled_ce_mean() -> Case:
    model = _mlp(3, 6, 3)
    data = [(torch.randn(n, 3, dtype=DTYPE), torch.randint(0, 3, (n,))) for n in BATCH_SIZES]
    return Case(
        name="subset-shuffled-ce-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(),
        params=[model[2].weight, model[0].bias],  # D = 24, out of order, rest held fixed
        data=data,
        notes="Only the last layer's weight and the first layer's bias, in that order.",
    )


def _single_batch_mse_sum() -> Case:
    model = _mlp(3, 6, 3)
    data = [(torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 3, dtype=DTYPE))]
    return Case(
        name="single-batch-mse-sum",
        model_func=model,
        loss_func=nn.MSELoss(reduction="sum"),
        params=list(model.parameters()),
        data=data,
    )


def _custom_quartic_mean() -> Case:
    model = _mlp(3, 6, 2)  # D = 38
    data = [(torch.randn(n, 3, dtype=DTYPE), torch.randn(n, 2, dtype=DTYPE)) for n in BATCH_SIZES]
    return Case(
        name="custom-quartic-mean",
        model_func=model,
        loss_func=QuarticLoss(reduction="mean"),
        params=list(model.parameters()),
        data=data,
        supports_fisher=False,
        notes="Custom loss 0.5*(f-y)^4: Hessian and GGN apply (the GGN is PSD as the loss is "
        "convex), Fisher-type matrices (MC, empirical, exact) do not.",
    )


def _seq_ce_model() -> nn.Sequential:
    # [N, T, F=3] -> linear(3, 4) -> tanh -> linear(4, 3) -> [N, C=3, T]; D = 31
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), ToChannelsFirst())


def _padded(y: Tensor, lengths: list[int], ignore_index: int) -> Tensor:
    """Targets ``[N, T]`` with positions from ``lengths[n]`` on set to ``ignore_index``."""
    y = y.clone()
    for n, length in enumerate(lengths):
        y[n, length:] = ignore_index
    return y


def _seq_ce_padded_mean() -> Case:
    model = _seq_ce_model()
    T = 4
    lengths = ([4, 2, 3, 1], [1, 0, 2], [0, 0], [4, 4, 3])  # batch 2 is all padding
    data = [
        (
            torch.randn(len(ls), T, 3, dtype=DTYPE),
            _padded(torch.randint(0, 3, (len(ls), T)), ls, -100),
        )
        for ls in lengths
    ]
    return Case(
        name="seq-ce-padded-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(ignore_index=-100),
        params=list(model.parameters()),
        data=data,
        notes="Padding: targets ignore_index=-100 at the end of every sequence, uneven per "
        "batch (one batch mostly padding, one entirely: PyTorch's batch mean is nan there). "
        "'mean' divides by the number of non-ignored targets of all data.",
    )


def _mlp_ce_weighted_mean() -> Case:
    model = _mlp(3, 6, 3)  # D = 45
    weight = torch.tensor([0.3, 1.0, 2.5], dtype=DTYPE)
    data = []
    for n in BATCH_SIZES:
        y = torch.randint(0, 3, (n,))
        y[0] = -100  # one ignored target per batch
        data.append((torch.randn(n, 3, dtype=DTYPE), y))
    return Case(
        name="mlp-ce-weighted-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(weight=weight),
        params=list(model.parameters()),
        data=data,
        supports_fisher=False,
        notes="Class weights (and one ignored target per batch): 'mean' divides by the summed "
        "weights of the non-ignored targets. No likelihood reading: Fisher types refuse it.",
    )


def _seq_ce_varlen_mean() -> Case:
    model = _seq_ce_model()
    shapes = ((4, 2), (3, 5), (5, 3))  # (N_B, T_B): the sequence length differs per batch
    data = [(torch.randn(n, t, 3, dtype=DTYPE), torch.randint(0, 3, (n, t))) for n, t in shapes]
    return Case(
        name="seq-ce-varlen-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(),
        params=list(model.parameters()),
        data=data,
        notes="Sequence length T differs between batches: 'mean' over all N_B * T_B positions.",
    )


def _seq_mse_varlen_mean() -> Case:
    # [N, T, 3] -> linear(3, 4) -> tanh -> linear(4, 2) -> [N, T, 2]; D = 26
    model = _mlp(3, 4, 2)
    shapes = ((4, 2), (3, 4), (5, 1))
    data = [
        (torch.randn(n, t, 3, dtype=DTYPE), torch.randn(n, t, 2, dtype=DTYPE)) for n, t in shapes
    ]
    return Case(
        name="seq-mse-varlen-mean",
        model_func=model,
        loss_func=nn.MSELoss(),
        params=list(model.parameters()),
        data=data,
        notes="Regression on [N, T, D] with T differing between batches: 'mean' over all "
        "N_B * T_B * D entries. A loss term (position) holds the D features of one token.",
    )


def _seq_ce_smoothed_mean() -> Case:
    model = _seq_ce_model()
    lengths = ([3, 1, 2, 3], [2, 3, 3], [1, 3, 2, 3, 0])
    data = [
        (
            torch.randn(len(ls), 3, 3, dtype=DTYPE),
            _padded(torch.randint(0, 3, (len(ls), 3)), ls, -1),
        )
        for ls in lengths
    ]
    return Case(
        name="seq-ce-smoothed-mean",
        model_func=model,
        loss_func=nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-1),
        params=list(model.parameters()),
        data=data,
        notes="Label smoothing 0.1 with padding (ignore_index=-1): the loss Hessian is the "
        "categorical one, so GGN = Fisher; the empirical Fisher uses the smoothed gradients.",
    )


_SEEDED_FACTORIES: dict[str, tuple[int, Callable[[], Case]]] = {
    **{
        f"mlp-{loss}-{reduction}": (10 + i, _mlp_case(loss, reduction))
        for i, (loss, reduction) in enumerate(
            (loss, reduction) for loss in ("mse", "ce", "bce") for reduction in ("mean", "sum")
        )
    },
    "cnn-ce-mean": (20, _cnn_ce_mean),
    "seq-ce-mean": (21, _seq_ce_mean),
    "dict-input-mse-mean": (22, _dict_input_mse_mean),
    "functional-ce-sum": (23, _functional_ce_sum),
    "subset-shuffled-ce-mean": (24, _subset_shuffled_ce_mean),
    "single-batch-mse-sum": (25, _single_batch_mse_sum),
    "custom-quartic-mean": (26, _custom_quartic_mean),
    "seq-ce-padded-mean": (27, _seq_ce_padded_mean),
    "mlp-ce-weighted-mean": (28, _mlp_ce_weighted_mean),
    "seq-ce-varlen-mean": (29, _seq_ce_varlen_mean),
    "seq-mse-varlen-mean": (30, _seq_mse_varlen_mean),
    "seq-ce-smoothed-mean": (31, _seq_ce_smoothed_mean),
}

CASE_FACTORIES: dict[str, Callable[[], Case]] = {
    name: (lambda seed=seed, build=build: _seeded(seed, build))
    for name, (seed, build) in _SEEDED_FACTORIES.items()
}


def case_ids() -> list[str]:
    """Names of all registered cases, in registry order."""
    return list(CASE_FACTORIES)


def make_case(name: str) -> Case:
    """Build a fresh instance of the case ``name``.

    Raises:
        KeyError: If no case has that name.
    """
    if name not in CASE_FACTORIES:
        raise KeyError(f"Unknown case {name!r}; known cases: {', '.join(case_ids())}.")
    return CASE_FACTORIES[name]()


FISHER_CASES: list[str] = [name for name in CASE_FACTORIES if make_case(name).supports_fisher]
"""Cases whose loss is MSE, cross-entropy or BCE-with-logits (all Fisher types apply)."""

MODULE_CASES: list[str] = [
    name for name in CASE_FACTORIES if isinstance(make_case(name).model_func, nn.Module)
]
"""Cases whose model is an ``nn.Module`` (module-based methods such as KFAC may apply)."""

SAME_SHAPE_CASES: list[str] = [name for name in CASE_FACTORIES if make_case(name).same_shapes]
"""Cases whose batches can be concatenated into one (every batch has the same shapes)."""

MEAN_CASES: list[str] = [
    name for name in CASE_FACTORIES if make_case(name).loss_func.reduction == "mean"
]
"""Cases with ``reduction="mean"`` (their batch scaling N_B / N is exercised)."""
