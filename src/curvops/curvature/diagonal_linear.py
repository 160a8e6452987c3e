r"""Closed-form exact diagonal for ``nn.Linear`` layers that see one input row per datum.

NOTE [linear closed form]: a layer :math:`z_n = W x_n + b` whose input holds one row
:math:`x_n` per datum (``x`` of shape ``[N, d_in]``) has the per-datum gradients
:math:`g_{j,n} x_n^\top` and :math:`g_{j,n}` for a backpropagated column :math:`j`, with
:math:`g_{j,n} = \partial (u_j^\top f) / \partial z_n`. Their squares summed over columns
and data need no per-datum gradient in parameter space:

.. math::
    \sum_{n,j} c_{j,n} (g_{j,n} x_n^\top)^{\odot 2}
    = \Bigl(\sum_j c_{j,n} g_{j,n}^{\odot 2}\Bigr)^\top_{n} \bigl(x_n^{\odot 2}\bigr)_n,

one matrix product per column chunk, as cheap as the layer's part of a gradient (the trick
behind BackPACK's diagonal extensions; Dangel, F., Kunstner, F., Hennig, P. (2020). BackPACK:
Packing more into backprop). One backward pass of the *batch* gives all :math:`g_{j,n}` at
once, because the column :math:`j` of datum :math:`n` enters only datum :math:`n`'s output
rows. A layer qualifies if it is called once, with a 2-d input whose leading axis is the
batch, and its parameters belong to no other module; for a random output cotangent its
closed-form gradient summed over the data is compared with the layer's true batch gradient,
and a layer whose weight or bias is also used elsewhere in the forward pass (which hooks
cannot see) falls back to the per-datum pass of :mod:`curvops.curvature.diagonals`.

NOTE [row-wise models]: both safeguards of the closed form (the per-datum outputs compared
with the batch output, and the probe of the batch gradient above) cost more than the
closed form itself for small layers, and neither can fail for a model built only from
modules whose output row :math:`n` depends on input row :math:`n` alone and which use no
parameters but their own: an ``nn.Linear``, an element-wise activation, ``nn.Identity``,
``nn.Dropout`` in evaluation mode or ``nn.Flatten`` keeping the leading axis, alone or
nested in ``nn.Sequential`` (exact types: a subclass may override ``forward``), with no
forward hooks anywhere, on an input tensor with a leading data axis and one more axis
at least. :func:`curvops.risk.module_state.row_wise` decides this from the model once per
pass; such models skip the safeguards, every other model keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import sqrt

import torch
from torch import Tensor, nn


@dataclass
class LinearUse:
    """An ``nn.Linear`` layer whose weight and/or bias are among the parameters.

    Attributes:
        module: The layer.
        weight: Position of its weight in the parameters, or ``None``.
        bias: Position of its bias in the parameters, or ``None``.
        x: Its input in the recorded forward pass.
        z: Its output in the recorded forward pass (part of the autograd graph).
        calls: How often it was called in the recorded forward pass.
    """

    module: nn.Module
    weight: int | None
    bias: int | None
    x: Tensor | None = None
    z: Tensor | None = None
    calls: int = 0

    @property
    def positions(self) -> list[int]:
        """Positions of its parameters."""
        return [i for i in (self.weight, self.bias) if i is not None]


def linear_layers(
    model: nn.Module, param_names: list[str], params: list[Tensor]
) -> list[LinearUse]:
    """The ``nn.Linear`` layers of ``model`` holding parameters, each parameter owned once.

    Args:
        model: The model.
        param_names: Names of ``params`` in ``model.named_parameters()``.
        params: The parameters.

    Returns:
        The candidate layers for the closed form.
    """
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    position = {name: i for i, name in enumerate(param_names)}
    uses = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        prefix = f"{name}." if name else ""
        found = {}
        for attr in ("weight", "bias"):
            i = position.get(prefix + attr)
            if i is not None and owners.get(id(params[i]), 0) == 1:
                found[attr] = i
        if found:
            uses.append(LinearUse(module, found.get("weight"), found.get("bias")))
    return uses


@contextlib.contextmanager
def recording(uses: list[LinearUse]) -> Iterator[None]:
    """Forward hooks recording each layer's input, output and number of calls."""

    def hook_of(use: LinearUse) -> Callable:
        def hook(module, args, output):
            use.calls += 1
            use.x = args[0] if args else None
            use.z = output

        return hook

    for use in uses:
        use.x, use.z, use.calls = None, None, 0
    handles = [use.module.register_forward_hook(hook_of(use)) for use in uses]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _qualifies(use: LinearUse, N: int) -> bool:
    x, z = use.x, use.z
    return (
        use.calls == 1
        and isinstance(x, Tensor)
        and isinstance(z, Tensor)
        and x.ndim == 2
        and z.ndim == 2
        and x.shape[0] == N
        and z.shape[0] == N
        and z.requires_grad
    )


TF32_TOLERANCE = 1e-2
"""Relative tolerance of comparisons of float32 CUDA results while TF32 is allowed."""


def roundoff_tolerance(t: Tensor) -> float:
    """Relative tolerance for two evaluations of the same quantity in different groupings.

    ``sqrt(eps)`` of the dtype; on CUDA in float32 with TF32 matrix products or convolutions
    allowed (about three significant digits), :data:`TF32_TOLERANCE`.
    """
    tol = sqrt(torch.finfo(t.dtype).eps)
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cudnn.allow_tf32
    if t.is_cuda and t.dtype == torch.float32 and tf32:
        tol = max(tol, TF32_TOLERANCE)
    return tol


def allclose(actual: Tensor, expected: Tensor, floor: float = 1e-30) -> bool:
    """Whether ``actual`` equals ``expected`` up to round-off.

    Both tolerances are relative: to the entries, and to ``expected``'s largest entry (at
    least ``floor``).
    """
    tol = roundoff_tolerance(expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return torch.allclose(actual, expected, rtol=tol, atol=tol * max(scale, floor))


def _verified(
    uses: list[LinearUse], output: Tensor, leaves: list[Tensor], u: Tensor
) -> list[LinearUse]:
    """The layers whose closed-form batch gradient for the cotangent ``u`` is the true one."""
    inputs = [use.z for use in uses] + [leaves[i] for use in uses for i in use.positions]
    grads = torch.autograd.grad(output, inputs, u, retain_graph=True, allow_unused=True)
    g_z, g_params = grads[: len(uses)], iter(grads[len(uses) :])
    verified = []
    for use, g in zip(uses, g_z):
        ok = True
        g = torch.zeros_like(use.z) if g is None else g
        for i, expected in zip(use.positions, g_params):
            expected = torch.zeros_like(leaves[i]) if expected is None else expected
            actual = g.T @ use.x if i == use.weight else g.sum(0)
            ok = ok and allclose(actual, expected)
        if ok:
            verified.append(use)
    return verified


def linear_diagonal(
    uses: list[LinearUse],
    output: Tensor,
    leaves: list[Tensor],
    column_chunks: Iterator[tuple[Tensor, Tensor | None]],
    N: int,
    out: list[Tensor],
    alpha: float,
    *,
    row_wise: bool = False,
) -> set[int]:
    r"""Add ``alpha`` times the closed-form diagonal of the qualifying layers to ``out``.

    See NOTE [linear closed form].

    Args:
        uses: Candidate layers, recorded during the forward pass that gave ``output``.
        output: The batch output (with its autograd graph to the layers' outputs).
        leaves: The parameter values the graph was built from.
        column_chunks: Chunks of backpropagated columns ``[C, *output.shape]`` with their
            per-datum coefficients ``[C, N]`` (``None``: ones).
        N: Number of data.
        out: Accumulators shaped like the parameters.
        alpha: Scale.
        row_wise: The model is row-wise (NOTE [row-wise models]): skip the probe.

    Returns:
        The positions of the parameters whose diagonal was added.
    """
    uses = [use for use in uses if _qualifies(use, N)]
    # a random direction: a reused weight shows for any cotangent but a zero one
    if uses and not row_wise:
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(output.shape, generator=gen, dtype=output.dtype)
        uses = _verified(uses, output, leaves, probe.to(output.device))
    for U, c in column_chunks:
        if not uses:
            break
        zs = [use.z for use in uses]
        if U.shape[0] == 1:  # one column (the empirical Fisher): no vmap over cotangents
            grads = torch.autograd.grad(output, zs, U[0], retain_graph=True, allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            grads = torch.autograd.grad(
                output, zs, U, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        for use, g in zip(uses, grads):
            if g is None:
                continue
            sq = g.square()  # [C, N, d_out]
            w = sq.sum(0) if c is None else torch.einsum("cn,cno->no", c, sq)
            if use.weight is not None:
                out[use.weight].addmm_(w.T, use.x.square(), alpha=alpha)
            if use.bias is not None:
                out[use.bias].add_(w.sum(0), alpha=alpha)
    return {i for use in uses for i in use.positions}
