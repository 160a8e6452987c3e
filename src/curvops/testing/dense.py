r"""Dense float64 ground truths of curvature matrices, built with ``torch.func``.

These references materialise the Hessian, the generalized Gauss-Newton (GGN), the empirical
Fisher (EF) and the model Jacobian of an empirical risk as dense matrices. They are slow
(:math:`\mathcal{O}(D^2)` memory) and meant for small problems: to test ``curvops``'s
operators and to let users verify them. They are deliberately written without the rest of
``curvops`` (no data loop, no loss knowledge), so that they stay an independent check.

NOTE [risk scaling]: following Dangel et al. (2025), eqs. (1) and (7), the empirical risk
on data :math:`\mathbb{D}` is the loss module's reduction applied to *all* loss terms at once,

.. math::

    \mathcal{L}_\mathbb{D}(\theta) = \frac{1}{Z_\mathbb{D}} \sum_\mathbb{B}
    \mathcal{L}^\text{sum}_\mathbb{B}(\theta),
    \qquad Z_\mathbb{D} = \sum_\mathbb{B} Z_\mathbb{B},

where :math:`\mathcal{L}^\text{sum}_\mathbb{B}` is the batch's loss with ``reduction="sum"``
(a weighted sum of its loss terms) and :math:`Z_\mathbb{B}` the denominator PyTorch's
``reduction="mean"`` divides that sum by. The references read :math:`Z_\mathbb{B}` off
PyTorch itself, as the ratio :math:`\mathcal{L}^\text{sum}_\mathbb{B} /
\mathcal{L}^\text{mean}_\mathbb{B}` of the loss module evaluated with both reductions (the
number of entries, of non-ignored targets, the sum of their class weights, ...; ``0`` for a
batch whose mean is ``nan`` because all its terms are ignored), without any knowledge of the
loss. For ``reduction="sum"``, :math:`Z_\mathbb{D} = 1`. Every matrix is built from the
batches' *sum*-reduced losses and divided by :math:`Z_\mathbb{D}` once, so it is the matrix of
the mean over all loss terms, however the data are batched, padded or weighted.

NOTE [parameter order]: all matrices are indexed by the flattened parameters
:math:`\theta = \mathrm{cat}(\mathrm{vec}\,\theta_1, \dots, \mathrm{vec}\,\theta_L)` in the
order the caller gives them (list order, or dict insertion order), each flattened row-major.

References:
    Dangel, F., Eschenhagen, R., Ormaniec, W., Fernandez, A., Tatzel, L., Kristiadi, A.
    (2025). Position: Curvature Matrices Should Be Democratized via Linear Operators.

    Schraudolph, N. N. (2002). Fast Curvature Matrix-Vector Products for Second-Order
    Gradient Descent.

    Kunstner, F., Hennig, P., Balles, L. (2019). Limitations of the Empirical Fisher
    Approximation for Natural Gradient Descent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

Params = Sequence[Tensor] | Mapping[str, Tensor]
Data = Iterable[tuple[Any, Tensor]]


# ==================================================================== input handling
def _param_list(params: Params) -> list[Tensor]:
    """Return the parameters as a list, checking they form a valid parameter set."""
    if isinstance(params, Mapping):
        tensors = list(params.values())
    elif isinstance(params, (list, tuple)):
        tensors = list(params)
    else:
        raise TypeError(
            f"params must be a list of tensors or a dict name -> tensor, got {type(params)}."
        )
    if not tensors:
        raise ValueError("params is empty: pass at least one parameter tensor.")
    for i, p in enumerate(tensors):
        if not isinstance(p, Tensor):
            raise TypeError(f"Parameter {i} is a {type(p)}, not a Tensor.")
        if not p.is_floating_point():
            raise TypeError(f"Parameter {i} has dtype {p.dtype}; parameters must be floating.")
    if len({id(p) for p in tensors}) != len(tensors):
        raise ValueError("params contains the same tensor twice: pass each parameter once.")
    dtype, device = tensors[0].dtype, tensors[0].device
    for i, p in enumerate(tensors):
        if p.dtype != dtype or p.device != device:
            raise ValueError(
                f"Parameter {i} has dtype/device {p.dtype}/{p.device}, but parameter 0 has "
                f"{dtype}/{device}: move all parameters to one dtype and device."
            )
    return tensors


def _make_forward(
    model_func: nn.Module | Callable, params: Params
) -> Callable[[list[Tensor], Any], Tensor]:
    """Return ``forward(param_values, X)`` evaluating the model with replaced parameters.

    For an ``nn.Module`` the parameters are located by identity in
    ``model_func.named_parameters()`` and substituted with
    :func:`torch.func.functional_call`; the module's other parameters stay fixed. A plain
    callable is called as ``model_func(params, X)`` with a dict (if ``params`` is a dict)
    or a list.
    """
    tensors = _param_list(params)
    if isinstance(model_func, nn.Module):
        names_by_id = {id(p): name for name, p in model_func.named_parameters()}
        names = []
        for i, p in enumerate(tensors):
            if id(p) not in names_by_id:
                raise ValueError(
                    f"Parameter {i} (shape {tuple(p.shape)}) is not a parameter of the model "
                    f"{type(model_func).__name__}. Pass tensors from model.parameters() "
                    f"(the objects themselves, not copies), or pass a callable "
                    f"(params, X) -> output as model_func."
                )
            names.append(names_by_id[id(p)])

        def forward(values: list[Tensor], X: Any) -> Tensor:
            return functional_call(model_func, dict(zip(names, values)), (X,))

        return forward

    if not callable(model_func):
        raise TypeError(
            f"model_func must be an nn.Module or a callable (params, X) -> output, got "
            f"{type(model_func)}."
        )
    if isinstance(params, Mapping):
        keys = list(params.keys())

        def forward(values: list[Tensor], X: Any) -> Tensor:
            return model_func(dict(zip(keys, values)), X)

        return forward

    def forward(values: list[Tensor], X: Any) -> Tensor:
        return model_func(list(values), X)

    return forward


class _FlatModel:
    """A model as a function of the flattened parameter vector :math:`\\theta`."""

    def __init__(self, model_func: nn.Module | Callable, params: Params):
        self.tensors = _param_list(params)
        self.forward_list = _make_forward(model_func, params)
        self.shapes = [p.shape for p in self.tensors]
        self.sizes = [prod(s) for s in self.shapes]
        self.dtype, self.device = self.tensors[0].dtype, self.tensors[0].device
        self.theta = torch.cat([p.detach().reshape(-1) for p in self.tensors])

    def __call__(self, theta: Tensor, X: Any) -> Tensor:
        values = [t.reshape(s) for t, s in zip(theta.split(self.sizes), self.shapes)]
        out = self.forward_list(values, X)
        if not isinstance(out, Tensor):
            raise TypeError(f"The model must return a Tensor, got {type(out)}.")
        return out


def _to_device(X: Any, device: torch.device) -> Any:
    if isinstance(X, Tensor):
        return X.to(device)
    if isinstance(X, Mapping):
        return {k: _to_device(v, device) for k, v in X.items()}
    return X


def _batches(
    data: Data, batch_size_fn: Callable[[Any], int] | None, device: torch.device
) -> list[tuple[Any, Tensor, int]]:
    """Return the batches as ``(X, y, N_B)`` on ``device``, checking the format."""
    batches = []
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"Batch {i} is not a pair (X, y): got {type(batch)}.")
        X, y = batch
        if batch_size_fn is not None:
            n = int(batch_size_fn(X))
        elif isinstance(X, Tensor):
            n = X.shape[0]
        else:
            raise ValueError(
                f"Batch {i} has inputs of type {type(X).__name__}, whose batch size is unknown. "
                f"Pass batch_size_fn, e.g. batch_size_fn=lambda X: X['x'].shape[0]."
            )
        if n <= 0:
            raise ValueError(f"Batch {i} has batch size {n}; batches must be non-empty.")
        batches.append((_to_device(X, device), _to_device(y, device), n))
    if not batches:
        raise ValueError("data is empty: pass at least one batch (X, y).")
    return batches


def _reduction(loss_func: nn.Module) -> str:
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_func).__name__} has reduction={reduction!r}, but the references need "
            f"a scalar batch loss: construct the loss with reduction='mean' or 'sum'."
        )
    return reduction


def _with_reduction(loss_func: nn.Module, reduction: str) -> nn.Module:
    """A shallow copy of ``loss_func`` with another reduction (the caller's module is untouched)."""
    copied = copy.copy(loss_func)
    copied.reduction = reduction
    return copied


def _batch_normaliser(loss_func: nn.Module, output: Tensor, y: Tensor, index: int) -> float:
    r"""PyTorch's ``"mean"`` denominator :math:`Z_\mathbb{B}` of one batch (NOTE [risk scaling])."""
    with torch.no_grad():
        total = _with_reduction(loss_func, "sum")(output, y)
        mean = _with_reduction(loss_func, "mean")(output, y)
    if bool(torch.isnan(mean)) and not bool(torch.isnan(total)):
        return 0.0  # all of the batch's loss terms are ignored: 0 / 0
    if float(mean) == 0.0:
        raise ValueError(
            f"Batch {index}: the loss is zero, so its 'mean' normaliser cannot be read off "
            "PyTorch as sum / mean. Use data with a non-zero loss, or reduction='sum'."
        )
    return float(total / mean)


def _total_normaliser(
    loss_func: nn.Module, model: _FlatModel, batches: list[tuple[Any, Tensor, int]]
) -> float:
    r""":math:`Z_\mathbb{D}` of NOTE [risk scaling] (``1`` for ``reduction="sum"``)."""
    if _reduction(loss_func) == "sum":
        return 1.0
    Z = sum(
        _batch_normaliser(loss_func, model(model.theta, X).detach(), y, i)
        for i, (X, y, _) in enumerate(batches)
    )
    if Z <= 0:
        raise ValueError("Every loss term of the data is ignored: the mean is undefined.")
    return Z


def _risk_weighted_sum(
    batch_matrix: Callable[[_FlatModel, Any, Tensor, nn.Module], Tensor],
    model_func: nn.Module | Callable,
    loss_func: nn.Module,
    params: Params,
    data: Data,
    batch_size_fn: Callable[[Any], int] | None,
) -> Tensor:
    r"""Sum of per-batch ``[D, D]`` matrices of the sum-reduced losses over :math:`Z_\mathbb{D}`.

    Args:
        batch_matrix: Maps the flat model, a batch's inputs and labels, and the loss module
            with ``reduction="sum"`` to the batch's matrix (e.g. the Hessian of the batch's
            summed loss).
        model_func: See :func:`dense_hessian`.
        loss_func: See :func:`dense_hessian`.
        params: See :func:`dense_hessian`.
        data: See :func:`dense_hessian`.
        batch_size_fn: See :func:`dense_hessian`.

    Returns:
        :math:`\frac{1}{Z_\mathbb{D}} \sum_\mathbb{B} M_\mathbb{B}`, ``[D, D]``
        (NOTE [risk scaling]).
    """
    model = _FlatModel(model_func, params)
    batches = _batches(data, batch_size_fn, model.device)
    Z = _total_normaliser(loss_func, model, batches)
    loss_sum = _with_reduction(loss_func, "sum")
    D = model.theta.numel()
    total = torch.zeros(D, D, dtype=model.dtype, device=model.device)
    # attention in the math backend, the only one with forward-mode and second derivatives
    # (PyTorch's fused CPU kernels have neither); it is the exact formula
    with sdpa_kernel([SDPBackend.MATH]), _UnfusedWeightNorm():
        for X, y, _ in batches:
            total = total + batch_matrix(model, X, y, loss_sum)
    return total / Z


class _UnfusedWeightNorm(TorchFunctionMode):
    r"""Weight normalisation :math:`w = g\, v / \|v\|` from elementary operations.

    PyTorch's fused ``torch._weight_norm`` has no forward-mode derivative and a wrong second
    derivative (torch 2.13, tested against finite differences in tests/testing/test_dense.py),
    so the references evaluate its formula (norms over every axis but ``dim``) instead.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = kwargs.get("dim", rest[0] if rest else 0)
            # dim=-1 (weight_norm(dim=None)) means one norm of the whole tensor
            axes = [a for a in range(v.ndim) if dim == -1 or a != dim]
            return v * (g / v.pow(2).sum(dim=axes, keepdim=True).sqrt())
        return func(*args, **kwargs)


# ==================================================================== references
def dense_hessian(
    model_func: nn.Module | Callable,
    loss_func: nn.Module,
    params: Params,
    data: Data,
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    r"""Dense Hessian of the empirical risk, :math:`H = \nabla^2_\theta \mathcal{L}_\mathbb{D}`.

    Accumulates per-batch Hessians (reverse over reverse mode, see NOTE [dense Hessian]),

    .. math::

        H = \frac{1}{Z_\mathbb{D}} \sum_\mathbb{B} \nabla^2_\theta
        \mathcal{L}^\text{sum}_\mathbb{B}(\theta),

    with the normaliser of NOTE [risk scaling] (Dangel et al. (2025), eqs. (2) and (7)).

    Args:
        model_func: An ``nn.Module`` (``params`` must be among its parameters; the others
            stay fixed) or a callable ``(params, X) -> output`` that receives a dict if
            ``params`` is a dict, else a list.
        loss_func: Loss module with ``reduction`` ``"mean"`` or ``"sum"``, mapping
            ``(output, y)`` to the batch loss.
        params: The parameters to differentiate, a list of tensors or a dict name -> tensor.
        data: Iterable of batches ``(X, y)``; ``X`` is a tensor or e.g. a dict.
        batch_size_fn: Maps ``X`` to its batch size; required if ``X`` is not a tensor.

    Returns:
        The ``[D, D]`` Hessian on the parameters' device and in their dtype.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> H = dense_hessian(model, nn.MSELoss(), list(model.parameters()), [(X, y)])
        >>> H.shape
        torch.Size([8, 8])
    """

    def batch_hessian(model: _FlatModel, X: Any, y: Tensor, loss_sum: nn.Module) -> Tensor:
        def batch_loss(theta: Tensor) -> Tensor:
            return loss_sum(model(theta, X), y)

        # NOTE [dense Hessian]: ``torch.autograd.functional.hessian`` (reverse over reverse
        # through the autograd engine, rows vectorised by batched gradients), not
        # ``torch.func.hessian`` / ``jacrev(jacrev(.))``: torch.func's second derivative
        # through native ``nn.LayerNorm`` is wrong on torch 2.13 (0.31 absolute error on a
        # Hessian of norm 2.5 against central finite differences; tested in
        # tests/testing/test_dense.py), while the autograd engine's agrees to 1e-9.
        try:
            return torch.autograd.functional.hessian(batch_loss, model.theta, vectorize=True)
        except RuntimeError:  # an operation without a batching rule (e.g. GroupNorm's)
            return torch.autograd.functional.hessian(batch_loss, model.theta)

    return _risk_weighted_sum(batch_hessian, model_func, loss_func, params, data, batch_size_fn)


def dense_gradient_and_loss(
    model_func: nn.Module | Callable,
    loss_func: nn.Module,
    params: Params,
    data: Data,
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gradient and value of the empirical risk :math:`\mathcal{L}_\mathbb{D}`.

    :math:`\mathcal{L}_\mathbb{D} = \frac{1}{Z_\mathbb{D}} \sum_\mathbb{B}
    \mathcal{L}^\text{sum}_\mathbb{B}` (NOTE [risk scaling]); the gradient by
    ``torch.func.grad``.

    Args:
        model_func: See :func:`dense_hessian`.
        loss_func: See :func:`dense_hessian`.
        params: See :func:`dense_hessian`.
        data: See :func:`dense_hessian`.
        batch_size_fn: See :func:`dense_hessian`.

    Returns:
        The flat gradient ``[D]`` (NOTE [parameter order]) and the risk (a 0-dim tensor).
    """
    model = _FlatModel(model_func, params)
    batches = _batches(data, batch_size_fn, model.device)
    Z = _total_normaliser(loss_func, model, batches)
    loss_sum = _with_reduction(loss_func, "sum")

    def risk(theta: Tensor) -> Tensor:
        return sum(loss_sum(model(theta, X), y) for X, y, _ in batches) / Z

    grad, value = torch.func.grad_and_value(risk)(model.theta)
    return grad, value.detach()


def dense_ggn(
    model_func: nn.Module | Callable,
    loss_func: nn.Module,
    params: Params,
    data: Data,
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    r"""Dense generalized Gauss-Newton matrix of the empirical risk.

    .. math::

        G = \frac{1}{Z_\mathbb{D}} \sum_\mathbb{B} J_\mathbb{B}^\top
        \left(\nabla^2_{f} \mathcal{L}^\text{sum}_\mathbb{B}\right) J_\mathbb{B},

    where :math:`J_\mathbb{B}` is the Jacobian of the batch's stacked model outputs
    :math:`f` w.r.t. :math:`\theta` (``torch.func.jacrev``) and
    :math:`\nabla^2_f \mathcal{L}_\mathbb{B}` the Hessian of the batch loss w.r.t. those
    outputs (``torch.func.hessian``); factors as in NOTE [risk scaling] (Schraudolph (2002);
    Dangel et al. (2025), eq. (3)). For ``MSELoss``, ``CrossEntropyLoss`` and
    ``BCEWithLogitsLoss`` this is also the exact (type-I) Fisher.

    Args:
        model_func: See :func:`dense_hessian`.
        loss_func: See :func:`dense_hessian`.
        params: See :func:`dense_hessian`.
        data: See :func:`dense_hessian`.
        batch_size_fn: See :func:`dense_hessian`.

    Returns:
        The ``[D, D]`` GGN on the parameters' device and in their dtype.
    """

    def batch_ggn(model: _FlatModel, X: Any, y: Tensor, loss_sum: nn.Module) -> Tensor:
        output = model(model.theta, X).detach()
        J = jacrev(model)(model.theta, X).reshape(output.numel(), model.theta.numel())
        H_out = hessian(lambda out: loss_sum(out, y))(output)
        H_out = H_out.reshape(output.numel(), output.numel())
        return J.T @ H_out @ J

    return _risk_weighted_sum(batch_ggn, model_func, loss_func, params, data, batch_size_fn)


# losses whose reduction="none" gives per-entry (element-wise) or per-position (class axis 1)
# losses, so that the references can form one loss per loss term
_ELEMENTWISE_LOSSES = ("MSELoss", "BCEWithLogitsLoss", "BCELoss", "L1Loss", "HuberLoss")
_CLASS_LOSSES = ("CrossEntropyLoss", "NLLLoss")
_GRADIENT_OF = ("loss-term", "datum")


def _check_classes(loss_func: nn.Module, output: Tensor) -> None:
    if type(loss_func).__name__ in _CLASS_LOSSES and output.ndim < 2:
        raise ValueError(
            f"{type(loss_func).__name__} needs outputs [N, C, ...] with a leading data axis, "
            f"got shape {tuple(output.shape)}."
        )


def _term_losses(loss_func: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-loss-term losses ``[N, P]``: one per position of every datum (summing features)."""
    name = type(loss_func).__name__
    if name not in _ELEMENTWISE_LOSSES + _CLASS_LOSSES:
        raise ValueError(
            f"dense_ef(gradient_of='loss-term') knows the loss terms of "
            f"{', '.join(_ELEMENTWISE_LOSSES + _CLASS_LOSSES)} only; got {name}. Use "
            "gradient_of='datum' for other losses."
        )
    none = _with_reduction(loss_func, "none")

    def terms(output: Tensor, y: Tensor) -> Tensor:
        losses = none(output, y)  # class losses: [N, *positions]; element-wise: like output
        if name in _ELEMENTWISE_LOSSES and losses.ndim >= 2:
            losses = losses.sum(dim=-1)  # the features of a position form one loss term
        return losses.reshape(output.shape[0], -1)

    return terms


def _datum_losses(loss_func: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-datum losses ``[N, 1]``: the sum-reduced loss of each row of the batch."""
    loss_sum = _with_reduction(loss_func, "sum")

    def datums(output: Tensor, y: Tensor) -> Tensor:
        n = output.shape[0]
        return torch.stack([loss_sum(output[j : j + 1], y[j : j + 1]) for j in range(n)])[:, None]

    return datums


def dense_ef(
    model_func: nn.Module | Callable,
    loss_func: nn.Module,
    params: Params,
    data: Data,
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
    gradient_of: str = "loss-term",
) -> Tensor:
    r"""Dense empirical Fisher, the un-centered covariance of per-term or per-datum gradients.

    .. math::

        E = \frac{1}{Z_\mathbb{D}} \sum_{i} \nabla_\theta \ell_i
        \left(\nabla_\theta \ell_i\right)^\top

    (Dangel et al. (2025), eq. (6); Kunstner et al. (2019)), with the normaliser
    :math:`Z_\mathbb{D}` of NOTE [risk scaling]. For ``gradient_of="loss-term"``,
    :math:`i` runs over the loss terms of all data: the loss module with
    ``reduction="none"``, summed over the last (feature) axis for element-wise losses
    (``MSELoss``, ``BCEWithLogitsLoss``, ...; class-axis losses such as
    ``CrossEntropyLoss`` already give one loss per position), one gradient per entry
    (position) of each datum. For ``gradient_of="datum"``, :math:`i` runs over the data: the
    loss module with ``reduction="sum"`` on row ``n`` of the batch output (summing the
    datum's loss terms, e.g. over sequence positions). The gradients come from
    ``torch.func.jacrev`` of all of a batch's term (or datum) losses.

    Args:
        model_func: See :func:`dense_hessian`.
        loss_func: See :func:`dense_hessian`. ``gradient_of="loss-term"`` needs a PyTorch
            loss with a per-entry or per-position ``reduction="none"``; ``"datum"`` accepts
            any loss.
        params: See :func:`dense_hessian`.
        data: See :func:`dense_hessian`.
        batch_size_fn: See :func:`dense_hessian`.
        gradient_of: ``"loss-term"`` (default) or ``"datum"``.

    Returns:
        The ``[D, D]`` empirical Fisher on the parameters' device and in their dtype.

    Raises:
        ValueError: For an unknown ``gradient_of``, a loss whose loss terms are unknown
            (``"loss-term"``), or if a batch's model output does not have the batch size as
            leading axis.
    """
    if gradient_of not in _GRADIENT_OF:
        raise ValueError(f"gradient_of must be one of {_GRADIENT_OF}, got {gradient_of!r}.")
    model = _FlatModel(model_func, params)
    batches = _batches(data, batch_size_fn, model.device)
    _reduction(loss_func)
    losses = _term_losses(loss_func) if gradient_of == "loss-term" else _datum_losses(loss_func)
    D = model.theta.numel()
    E = torch.zeros(D, D, dtype=model.dtype, device=model.device)
    for i, (X, y, n) in enumerate(batches):
        output = model(model.theta, X).detach()
        if output.ndim == 0 or output.shape[0] != n:
            raise ValueError(
                f"Batch {i}: the model output has shape {tuple(output.shape)}, but the batch "
                f"has {n} data; the empirical Fisher needs the data on the output's leading axis."
            )
        _check_classes(loss_func, output)

        def batch_losses(theta: Tensor, X=X, y=y) -> Tensor:
            return losses(model(theta, X), y).reshape(-1)

        grads = jacrev(batch_losses)(model.theta)  # [N_B * terms, D]
        E = E + grads.T @ grads
    return E / _total_normaliser(loss_func, model, batches)


def dense_jacobian(
    model_func: nn.Module | Callable,
    params: Params,
    data: Data,
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    r"""Dense Jacobian of the stacked model outputs w.r.t. the parameters.

    .. math::

        J = \begin{pmatrix} J_\theta f(X_{\mathbb{B}_1}) \\ \vdots \\
        J_\theta f(X_{\mathbb{B}_K}) \end{pmatrix} \in \mathbb{R}^{N \cdot \dim(f_n)
        \times D},

    rows ordered by batch, then datum, then output entry (row-major); computed with
    ``torch.func.jacrev``. No loss is involved.

    Args:
        model_func: See :func:`dense_hessian`.
        params: See :func:`dense_hessian`.
        data: Iterable of batches ``(X, y)``; the labels ``y`` are ignored.
        batch_size_fn: See :func:`dense_hessian` (only used to validate the batches).

    Returns:
        The ``[N * out_dim, D]`` Jacobian on the parameters' device and in their dtype.
    """
    model = _FlatModel(model_func, params)
    batches = _batches(data, batch_size_fn, model.device)
    D = model.theta.numel()
    rows = [jacrev(model)(model.theta, X).reshape(-1, D) for X, _, _ in batches]
    return torch.cat(rows)


def dense_block_diagonal(M: Tensor, sizes: Sequence[int]) -> Tensor:
    r"""Keep the diagonal blocks of a square matrix and zero the rest.

    For a partition :math:`D = d_1 + \dots + d_L` returns
    :math:`\mathrm{blockdiag}(M_{11}, \dots, M_{LL})`, e.g. the per-layer blocks a
    Kronecker-factored approximation targets.

    Args:
        M: Square ``[D, D]`` matrix.
        sizes: Block sizes :math:`d_1, \dots, d_L` (positive, summing to ``D``), e.g.
            ``[p.numel() for p in params]``.

    Returns:
        A new ``[D, D]`` matrix equal to ``M`` on the diagonal blocks and zero elsewhere.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}.")
    sizes = [int(s) for s in sizes]
    if any(s <= 0 for s in sizes) or sum(sizes) != M.shape[0]:
        raise ValueError(
            f"sizes {sizes} must be positive and sum to the matrix dimension {M.shape[0]}."
        )
    out = torch.zeros_like(M)
    start = 0
    for s in sizes:
        out[start : start + s, start : start + s] = M[start : start + s, start : start + s]
        start += s
    return out
