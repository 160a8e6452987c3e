r"""Pure per-batch curvature products.

Each function takes a function of the parameters (the model output or the batch loss on one
batch), the parameter values, and a matrix ``V`` as a tensor list with a *leading* column axis
(``[K, *shape]`` per parameter), and returns the batch's product in the same format.
Operators only bind model, loss, parameters and data to these functions (DESIGN layer 4).

NOTE [product passes]: the strategies below were chosen by measurement (``python -m
benchmarks``; CPU, eager mode), in multiples of one gradient:

* GGN, empirical and Monte-Carlo Fisher, one column: ONE forward pass computes the output
  and its Jacobian-vector product :math:`Jv` at once (forward-mode dual tensors from
  ``torch.autograd.forward_ad`` inside a normal autograd graph) while recording what the
  backward needs; the output-space matrix is applied to :math:`Jv`; ONE backward pass gives
  :math:`J^\top(\cdot)`. This saves the second forward pass of ``torch.func.jvp`` +
  ``torch.func.vjp``.
* Several columns: ``torch.func.vmap`` over ``jvp`` and over the ``vjp`` of one forward
  pass, as many columns at a time as a memory budget allows (NOTE [columns per pass];
  ``torch.func.linearize`` measured slower).
* Hessian: reverse-over-reverse (a gradient with ``create_graph=True``, then one backward
  per column through it) or forward-over-reverse (dual tensors through the gradient
  computation); the default ``"by-model"`` picks one from the operations the model calls
  (NOTE [Hessian mode by model]), ``"auto"`` times both on the first batch
  (:class:`ProductPlan`), with reverse-over-reverse as the fall-back for operations whose
  forward-mode derivative PyTorch lacks or gets wrong.
* Attention (``F.scaled_dot_product_attention``) keeps PyTorch's fused kernels for output
  and backward and gets a closed-form tangent (:mod:`curvops.curvature.attention`); the
  Hessian uses the math backend, the only one with second derivatives.

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian.
    Schraudolph, N. N. (2002). Fast curvature matrix-vector products for second-order
    gradient descent.
    Dagréou, M., Ablin, P., Vaiter, S., Moreau, T. (2024). How to compute Hessian-vector
    products? ICLR Blogposts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from curvops.curvature.attention import differentiable_attention
from curvops.curvature.derivative_fixes import ForwardModeFixes
from curvops.curvature.derivative_fixes import derivative_fixes as _derivative_fixes
from curvops.curvature.tangent_rules import efficient_tangents

ParamFn = Callable[..., Tensor]
OutputMatmat = Callable[[Tensor, Tensor], Tensor]

ACTIVATIONS_PER_COLUMN = 8
"""Largest-intermediate-sized tensors one column holds during a pass (NOTE [columns per
pass])."""

COLUMN_MEMORY_BUDGET = 2**27
"""Default bytes that the columns of one vectorised pass may hold (128 MiB; NOTE [columns per
pass])."""


class HessianMode(str, Enum):
    """How Hessian-vector products differentiate twice (Dagréou et al., 2024)."""

    AUTO = "auto"
    BY_MODEL = "by-model"
    REVERSE_OVER_REVERSE = "reverse-over-reverse"
    FORWARD_OVER_REVERSE = "forward-over-reverse"


@dataclass
class ProductPlan:
    """Choices an operator learns at its first product and reuses afterwards.

    Attributes:
        hessian_mode: The Hessian strategy picked by the rule or the probe (``None``: not
            decided yet).
        probe_seconds: Time per strategy measured by the probe (for inspection).
        hessian_reason: Why the rule of ``"by-model"`` picked its mode (for inspection).
        batched_backward: Whether multi-column GGN-type products apply :math:`J^\top` to a
            chunk of columns by one vectorised backward pass (``True``) or by one plain
            backward pass per column through the same graph (``False``); ``None``: not
            decided yet (NOTE [batched or looped backward]).
        derivative_fixes: Whether the passes must reroute functions with broken derivative
            rules (:class:`ForwardModeFixes`), learnt at the first product; ``None``: not
            known yet (the reroute is on).
        max_columns_per_pass: Most columns of a multi-column product per vectorised pass
            (``None``: no limit beyond the memory budget).
        column_memory_budget: Bytes the columns of one vectorised pass may hold (estimated,
            NOTE [columns per pass]).
        columns_per_pass: Columns per pass of the latest multi-column product (inspection).
        column_passes: Number of vectorised column passes run so far (inspection, tests).
    """

    hessian_mode: HessianMode | None = None
    probe_seconds: dict[str, float] | None = None
    hessian_reason: str | None = None
    batched_backward: bool | None = None
    derivative_fixes: bool | None = None
    max_columns_per_pass: int | None = None
    column_memory_budget: int = COLUMN_MEMORY_BUDGET
    columns_per_pass: int | None = None
    column_passes: int = 0

    def columns_for(self, K: int, bytes_per_column: int) -> int:
        """Columns per vectorised pass for ``K`` columns (NOTE [columns per pass]).

        Also records the choice (:attr:`columns_per_pass`).
        """
        chunk = columns_per_pass(
            K, bytes_per_column, self.column_memory_budget, self.max_columns_per_pass
        )
        self.columns_per_pass = chunk
        return chunk


def columns_per_pass(
    K: int, bytes_per_column: int, memory_budget: int, max_columns: int | None = None
) -> int:
    r"""How many of ``K`` columns one vectorised pass takes (NOTE [columns per pass]).

    NOTE [columns per pass]: a multi-column product linearises the model once per batch
    and pushes a chunk of columns through the linearisation at once (``vmap``), so the
    chunk's tangents, cotangents and results are alive together. Their memory is estimated
    per column as ``itemsize`` times three parameter-sized vectors (the column, its result
    and a temporary) plus :data:`ACTIVATIONS_PER_COLUMN` times the largest intermediate
    result of the forward pass (found by :class:`_CallSpy` on every linearisation): forward
    mode frees a tangent once the next one is formed, and the backward pass holds a few
    cotangents at a time, so the peak per column is a few activations, not all of them (the
    sum of all intermediates overestimated the measured peak about 4× on the ResNet and
    left one column per pass, as slow per column as a lone product). The chunk is the largest
    that fits ``memory_budget`` (at least one column), at most ``max_columns``, evened out
    over the passes it needs (9 columns, at most 4 per pass: 3 passes of 3 rather than 4, 4
    and 1; 10 columns: 4, 4 and 2). Large
    chunks amortise the per-pass Python and dispatch overhead and turn per-column
    matrix-vector work into matrix-matrix products: the dense GGN of a 2,410-parameter MLP
    (128 data, one thread) took 0.67 s with 8 columns per pass, 0.18 s with 512 and 0.32 s
    with all 2,410 (caches), against 0.32 s for curvlinops 3.0.1's ``G @ I``; the default
    budget, :data:`COLUMN_MEMORY_BUDGET`, allows 838 columns per pass there (3 passes of 804), and
    10, 3, 7 and 9 on the benchmark MLP, CNN, ResNet and GPT.

    Args:
        K: Number of columns.
        bytes_per_column: Estimated bytes one column needs during a pass.
        memory_budget: Bytes the chunk may hold.
        max_columns: Most columns per pass, or ``None``.

    Returns:
        Columns per pass, between 1 and ``K``.
    """
    chunk = max(1, memory_budget // max(bytes_per_column, 1))
    if max_columns is not None:
        chunk = min(chunk, max_columns)
    chunk = max(1, min(K, chunk))
    passes = -(-K // chunk)
    return -(-K // passes)  # the same number of passes, of (nearly) equal size


# ==================================================================== building blocks
def _detached_leaves(params: list[Tensor]) -> list[Tensor]:
    """Fresh leaves sharing storage with ``params`` (the caller's tensors are untouched)."""
    return [p.detach().requires_grad_(True) for p in params]


def _vjp(out: Tensor, leaves: list[Tensor], cotangent: Tensor, **kwargs) -> list[Tensor]:
    r""":math:`J^\top u` by one backward pass; zeros for parameters ``out`` does not use."""
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in leaves]
    grads = torch.autograd.grad(out, leaves, cotangent, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def _vjp_into(out: Tensor, leaves: list[Tensor], cotangent: Tensor, grads: list[Tensor]) -> None:
    r"""``grads[i] +=`` :math:`(J^\top u)_i` in place, by one backward pass.

    The leaves' ``.grad`` are set to ``grads`` for the pass: PyTorch's gradient accumulation
    adds into an existing ``.grad`` in place, so no parameter-sized result is allocated and
    added afterwards. The leaves are private copies (:func:`_detached_leaves`); the caller's
    ``.grad`` is never touched.
    """
    if not out.requires_grad:
        return
    for leaf, g in zip(leaves, grads):
        leaf.grad = g
    try:
        torch.autograd.backward(out, cotangent, inputs=leaves)
    finally:
        for leaf in leaves:
            leaf.grad = None


def _stack_columns(columns: list[list[Tensor]]) -> list[Tensor]:
    """``K`` tensor lists -> one tensor list with a leading column axis."""
    if len(columns) == 1:
        return [t.unsqueeze(0) for t in columns[0]]
    return [torch.stack(parts) for parts in zip(*columns)]


def plain_tangent(t: Tensor) -> Tensor:
    """``t`` as a tangent that ``make_dual`` takes without copying it again.

    ``make_dual`` with a view of a differently shaped base as tangent (a column of ``V``)
    is orders of magnitude slower than with a plain tensor (torch 2.13), and a tangent whose
    storage is not exactly its own (an offset, or a larger storage) is copied into a
    zero-filled new tensor; one plain copy is cheaper than that fill and copy.
    """
    t = t.detach()
    owns_storage = (
        t.storage_offset() == 0
        and t.is_contiguous()
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    return t if owns_storage else t.clone(memory_format=torch.contiguous_format)


def _forward_with_tangent(
    f: ParamFn, leaves: list[Tensor], tangents: list[Tensor]
) -> tuple[Tensor, Tensor]:
    r"""One forward pass giving :math:`f(\theta)` (with its autograd graph) and :math:`Jv`.

    Args:
        f: Maps the parameters (as positional arguments) to the output.
        leaves: Parameter values that require grad (the graph leads to them).
        tangents: The direction :math:`v`, shaped like ``leaves``.

    Returns:
        The output (differentiable w.r.t. ``leaves``) and the detached tangent :math:`Jv`.
    """
    with (
        torch.enable_grad(),
        fwAD.dual_level(),
        efficient_tangents(),
        torch.autograd.graph.saved_tensors_hooks(_without_tangent, _identity),
    ):
        duals = [fwAD.make_dual(p, plain_tangent(t)) for p, t in zip(leaves, tangents)]
        with _clear_forward_mode_errors():
            out, tangent = fwAD.unpack_dual(f(*duals))
        tangent = torch.zeros_like(out) if tangent is None else tangent.detach()
    return out, tangent


@contextlib.contextmanager
def _clear_forward_mode_errors() -> Iterator[None]:
    """Explain PyTorch's error for models without forward-mode support (``torch.compile``)."""
    try:
        yield
    except NotImplementedError as e:
        message = str(e)
        if message.startswith("Trying to use forward AD with "):
            op = message.removeprefix("Trying to use forward AD with ").split(" that ")[0]
            raise NotImplementedError(
                f"The model calls {op}, which has no forward-mode derivative in PyTorch, but "
                "GGN, Fisher and Jacobian products (and the Hessian's forward-over-reverse "
                "mode) differentiate the model in forward mode. If it is spectral_norm in "
                "training mode (its power iteration writes with out=), call model.eval(); "
                "otherwise use HessianLinearOperator with its default reverse-over-reverse "
                "mode, or replace the operation."
            ) from e
        if "jvp function for custom autograd.Function" not in message:
            raise
        raise NotImplementedError(
            "The model runs a custom autograd.Function without a forward-mode (jvp) rule, "
            "which GGN, Fisher and Jacobian products need. A torch.compile'd model is one: "
            "pass the uncompiled module (e.g. `compiled._orig_mod`) instead. Otherwise "
            "implement `jvp` for the custom function."
        ) from e


def _without_tangent(t: Tensor) -> Tensor:
    """Save a tensor for the backward pass without its tangent.

    The backward pass needs primal values only; saving the dual tensor itself would keep its
    tangent alive as long as the graph (twice the activation memory).
    """
    return t.detach() if fwAD.unpack_dual(t).tangent is not None else t


def _identity(t: Tensor) -> Tensor:
    return t


def jacobian_matmat(f: ParamFn, params: list[Tensor], V: list[Tensor]) -> Tensor:
    r"""Jacobian-matrix product :math:`J V` by forward-mode autodiff.

    Args:
        f: Maps the parameters (as positional arguments) to the output.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.

    Returns:
        ``[K, *output_shape]``.
    """
    params = [p.detach() for p in params]
    if V[0].shape[0] == 1:
        with torch.no_grad(), fwAD.dual_level(), efficient_tangents(), _clear_forward_mode_errors():
            duals = [fwAD.make_dual(p, plain_tangent(v[0])) for p, v in zip(params, V)]
            out, tangent = fwAD.unpack_dual(f(*duals))
            tangent = torch.zeros_like(out) if tangent is None else tangent
        return tangent.unsqueeze(0)
    with differentiable_attention(), ForwardModeFixes(), _clear_forward_mode_errors():
        return vmap(lambda *v: jvp(f, tuple(params), v)[1])(*V)


def jacobian_t_matmat(f: ParamFn, params: list[Tensor], U: Tensor) -> list[Tensor]:
    r"""Transposed-Jacobian-matrix product :math:`J^\top U` by reverse-mode autodiff.

    One forward pass, then one backward pass per column through the same graph.

    Args:
        f: Maps the parameters (as positional arguments) to the output.
        params: Parameter values.
        U: ``[K, *output_shape]``.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    leaves = _detached_leaves(params)
    with torch.enable_grad():
        out = f(*leaves)
    K = U.shape[0]
    columns = [_vjp(out, leaves, U[k], retain_graph=k < K - 1) for k in range(K)]
    return _stack_columns(columns)


def _output_buffers(
    params: list[Tensor], V: list[Tensor], out: list[Tensor] | None
) -> list[Tensor]:
    """The accumulators of a product: ``out``, or zeros ``[K, *param_shape]``."""
    if out is not None:
        return out
    K = V[0].shape[0]
    return [torch.zeros(K, *p.shape, dtype=p.dtype, device=p.device) for p in params]


def _add_columns(out: list[Tensor], start: int, columns: list[Tensor], alpha: float) -> None:
    """``out[i][start : start + K] += alpha * columns[i]`` for every parameter."""
    for o, c in zip(out, columns):
        o[start : start + c.shape[0]].add_(c, alpha=alpha)


_CONVOLUTIONS = (
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)


class _CallSpy(TorchFunctionMode):
    """Records whether any of the given torch functions is called (and changes nothing).

    Also records the most elements of a tensor the calls return (:attr:`largest`), the
    activation estimate of NOTE [columns per pass].
    """

    def __init__(self, functions: tuple = ()):
        super().__init__()
        self.functions = functions
        self.called = False
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.functions:
            self.called = True
        result = func(*args, **(kwargs or {}))
        parts = result if isinstance(result, (tuple, list)) else (result,)
        for r in parts:
            if isinstance(r, Tensor):
                self.largest = max(self.largest, r.numel())
        return result

    def bytes_per_column(self, params: tuple[Tensor, ...] | list[Tensor]) -> int:
        """Estimated bytes of one column in a vectorised pass (NOTE [columns per pass])."""
        D = sum(p.numel() for p in params)
        itemsize = params[0].element_size() if params else 4
        return itemsize * (3 * D + ACTIVATIONS_PER_COLUMN * self.largest)


def _add_transposed_chunk(
    out: list[Tensor], start: int, vjp_fn, U: Tensor, batched: bool, alpha: float
) -> None:
    """``out[i][start : start + C] += alpha`` :math:`J^\top U` for columns ``U`` ``[C, ...]``."""
    if batched:
        _add_columns(out, start, list(vmap(vjp_fn)(U)), alpha)
        return
    for j, u in enumerate(U):
        _add_columns(out, start + j, [g.unsqueeze(0) for g in vjp_fn(u)], alpha)


def linearized_matmat(
    f: ParamFn,
    output_matmat: OutputMatmat,
    params: list[Tensor],
    V: list[Tensor],
    *,
    out: list[Tensor] | None = None,
    alpha: float = 1.0,
    plan: ProductPlan | None = None,
) -> list[Tensor]:
    r"""Product :math:`J^\top M J V` with an output-space matrix :math:`M` applied by a function.

    One column: one forward pass with dual tensors (output, :math:`Jv` and the autograd graph
    at once), :math:`u = M(f, Jv)`, one backward pass :math:`J^\top u`. Several columns:
    ``torch.func.vmap`` over ``jvp`` in chunks of columns (NOTE [columns per pass]), and the
    ``vjp`` of one forward pass, vectorised over a chunk or applied column by column.

    NOTE [batched or looped backward]: vectorising the backward pass wins on matmul-dominated
    nets (MLP 0.48 vs 0.55 gradients per column, GPT 0.016 vs 0.018 s), but on convolutional
    nets (CPU) PyTorch's batching rules of convolution and pooling backward copy and
    zero-fill chunk-sized tensors, and plain backward passes through the same graph, one per
    column, measured up to twice as fast (CNN 0.43 vs 0.82, ResNet 0.71 vs 1.04 gradients per
    column). So the backward runs per column if the forward pass calls a convolution, which
    is recorded in ``plan`` at the first product. The rule is deterministic (unlike a timing
    probe), so the same operator gives bitwise the same products in every run.

    Args:
        f: Maps the parameters (as positional arguments) to the output.
        output_matmat: Maps the detached output and ``[K, *output_shape]`` columns to
            :math:`M` times them.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.
        out: Accumulators ``[K, *param_shape]`` to add ``alpha`` times the product to (in
            place, no intermediate copy); new zeros if ``None``.
        alpha: Scale of the product.
        plan: Where the choice of backward strategy is recorded and reused.

    Returns:
        ``out`` (tensor list ``[K, *param_shape]``).
    """
    K = V[0].shape[0]
    out = _output_buffers(params, V, out)
    if K == 1:
        leaves = _detached_leaves(params)
        result, Jv = _forward_with_tangent(f, leaves, [v[0] for v in V])
        u = output_matmat(result.detach(), Jv.unsqueeze(0))[0]
        _vjp_into(result, leaves, u if alpha == 1.0 else alpha * u, [o[0] for o in out])
        return out
    params = tuple(p.detach() for p in params)
    plan = ProductPlan() if plan is None else plan
    with differentiable_attention(), _derivative_fixes(plan), _clear_forward_mode_errors():
        with _CallSpy(_CONVOLUTIONS) as spy:  # NOTE [columns per pass]
            result, vjp_fn = vjp(f, *params)
        if plan.batched_backward is None:  # NOTE [batched or looped backward]
            plan.batched_backward = not spy.called
        batched = plan.batched_backward
        result = result.detach()
        size = plan.columns_for(K, spy.bytes_per_column(params))
        for start in range(0, K, size):
            chunk = [v[start : start + size] for v in V]
            if size < K:
                chunk = [c.contiguous() for c in chunk]
            JV = vmap(lambda *v: jvp(f, params, v)[1])(*chunk)
            _add_transposed_chunk(out, start, vjp_fn, output_matmat(result, JV), batched, alpha)
            plan.column_passes += 1
    return out


def _batched_vjp(g: Tensor, x: Tensor, U: Tensor) -> Tensor:
    r"""The rows of :math:`(\partial g / \partial x)^\top U_k` for all columns ``U`` ``[K, ...]``.

    One vectorised backward pass (``is_grads_batched``) instead of one per column (which
    cost 0.55 s of a 1.0 s dense GGN of a 2,410-parameter MLP: one Python-level backward per
    column); falls back to the loop where PyTorch has no batching rule for an operation of
    the graph.
    """
    K = U.shape[0]
    if K > 1:
        try:
            (h,) = torch.autograd.grad(g, x, U, retain_graph=True, is_grads_batched=True)
            return h
        except RuntimeError:  # an operation without a batching rule: loop over the columns
            pass
    return torch.stack([_vjp(g, [x], U[k], retain_graph=k < K - 1)[0] for k in range(K)])


def loss_hessian_matmat(loss_of_output: Callable[[Tensor], Tensor]) -> OutputMatmat:
    r"""Output-space Hessian product :math:`U \mapsto \nabla_f^2 \ell \, U` by autodiff.

    Reverse-over-reverse in output space (cheap: outputs are small next to the network),
    which also works around PyTorch's forward-mode bug for ``mse_loss`` ("ZeroTensors are
    immutable", torch 2.13).

    Args:
        loss_of_output: Maps the model output to the scalar batch loss.

    Returns:
        A function ``(output, U [K, *output_shape]) -> [K, *output_shape]``.
    """

    def matmat(output: Tensor, U: Tensor) -> Tensor:
        with torch.enable_grad():
            out = output.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_of_output(out), out, create_graph=True)
            if not g.requires_grad:  # a loss linear in the output
                return torch.zeros_like(U)
            return _batched_vjp(g, out, U)

    return matmat


def ggn_matmat(
    f: ParamFn,
    loss_of_output: Callable[[Tensor], Tensor],
    params: list[Tensor],
    V: list[Tensor],
    *,
    out: list[Tensor] | None = None,
    alpha: float = 1.0,
    plan: ProductPlan | None = None,
) -> list[Tensor]:
    r"""GGN-matrix product :math:`J^\top (\nabla_f^2 \ell) J V` (Schraudolph, 2002).

    Forward mode gives :math:`JV` in the same pass as the output, a Hessian-vector product in
    output space applies the loss Hessian, and one reverse pass gives :math:`J^\top(\cdot)`
    (NOTE [product passes]).

    Args:
        f: Maps the parameters (as positional arguments) to the model output.
        loss_of_output: Maps the model output to the scalar batch loss.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.
        out: Accumulators, see :func:`linearized_matmat`.
        alpha: Scale of the product.
        plan: See :func:`linearized_matmat`.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    return linearized_matmat(
        f, loss_hessian_matmat(loss_of_output), params, V, out=out, alpha=alpha, plan=plan
    )


def factor_ggn_matmat(
    f: ParamFn,
    factors_of_output: Callable[[Tensor], Tensor],
    params: list[Tensor],
    V: list[Tensor],
    *,
    terms: tuple[Callable[[Tensor], Tensor], Callable[[Tensor, tuple], Tensor]] | None = None,
    out: list[Tensor] | None = None,
    alpha: float = 1.0,
    plan: ProductPlan | None = None,
) -> list[Tensor]:
    r"""Product with :math:`J^\top (\sum_{k, g} s_{k,g} s_{k,g}^\top) J` for per-datum factors.

    With ``factors`` from :meth:`curvops.losses.LikelihoodLossSpec.shared_output_factors` this
    is the empirical Fisher (true gradients) or the Monte-Carlo Fisher (sampled gradients): the
    GGN of the pseudo-loss :math:`\tilde\ell_n = \frac{1}{2}\sum_{k,g} (s_{k,g}[n]^\top
    f_{n,g})^2` (paper §2.1, "FVPs via GGNVPs"), where :math:`g` runs over the groups of
    output entries whose inner products are taken separately: the whole datum (``terms`` is
    ``None``), or each loss term (position) of a datum, which splits every factor into one
    factor per position without forming the split columns (NOTE [output factors] of
    :mod:`curvops.losses.likelihood`). The factors are evaluated once per call, at the output.

    Args:
        f: Maps the parameters (as positional arguments) to the model output ``[N, ...]``.
        factors_of_output: Maps the (detached) model output ``[N, ...]`` to the per-datum
            output-space factors ``[J, N, ...]``.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.
        terms: ``(to_terms, from_terms)``: views ``[L, N, ...] -> [L, N, P, F]`` of the
            output by position and back (``from_terms(t, output_shape)``), or ``None`` for
            one group per datum.
        out: Accumulators, see :func:`linearized_matmat`.
        alpha: Scale of the product.
        plan: See :func:`linearized_matmat`.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    cache: dict[str, Tensor] = {}

    def grouped(t: Tensor) -> Tensor:  # [L, N, ...] -> [L, N, G, M]
        if terms is None:
            return t.reshape(t.shape[0], t.shape[1], 1, -1)
        return terms[0](t)

    def matmat(output: Tensor, U: Tensor) -> Tensor:
        if "S" not in cache:
            cache["S"] = grouped(factors_of_output(output))  # [J, N, G, M]
        S = cache["S"]
        coeff = torch.einsum("jngm,kngm->kjng", S, grouped(U))
        result = torch.einsum("kjng,jngm->kngm", coeff, S)
        if terms is None:
            return result.reshape(U.shape)
        return terms[1](result, tuple(U.shape[1:]))

    return linearized_matmat(f, matmat, params, V, out=out, alpha=alpha, plan=plan)


# ==================================================================== Hessian
def _hessian_reverse_over_reverse(
    loss: ParamFn,
    params: list[Tensor],
    V: list[Tensor],
    out: list[Tensor],
    alpha: float,
    plan: ProductPlan | None = None,
) -> None:
    r"""Reverse-over-reverse: one gradient with its graph, then :math:`\nabla (g^\top v)`.

    Several columns go through the graph of the same gradient in vectorised chunks
    (``is_grads_batched``; NOTE [columns per pass]) unless the model calls a convolution
    (then one backward per column, NOTE [batched or looped backward]).
    """
    leaves = _detached_leaves(params)
    K = V[0].shape[0]
    spy = _CallSpy(_CONVOLUTIONS)  # one column: no spy (its Python hook costs per operation)
    # NOTE [weight norm]: PyTorch's double backward of the fused weight norm is wrong too
    with (
        torch.enable_grad(),
        differentiable_attention(),
        _derivative_fixes(plan),
        spy if K > 1 else contextlib.nullcontext(),
    ):
        grads = torch.autograd.grad(loss(*leaves), leaves, create_graph=True, allow_unused=True)
    pairs = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not pairs:  # the loss is at most linear in the parameters
        return
    if K > 1 and not spy.called:
        plan = ProductPlan() if plan is None else plan
        size = plan.columns_for(K, spy.bytes_per_column(params))
        if _hessian_batched(pairs, leaves, V, out, alpha, size, plan):
            return
    for k in range(K):
        hv = torch.autograd.grad(
            [g for g, _ in pairs],
            leaves,
            [V[i][k] for _, i in pairs],
            retain_graph=k < K - 1,
            allow_unused=True,
        )
        for o, h in zip(out, hv):
            if h is not None:
                o[k].add_(h, alpha=alpha)


def _hessian_batched(
    pairs: list[tuple[Tensor, int]],
    leaves: list[Tensor],
    V: list[Tensor],
    out: list[Tensor],
    alpha: float,
    size: int,
    plan: ProductPlan,
) -> bool:
    """Push chunks of ``size`` columns through the gradient's graph at once.

    Returns ``False`` (having added nothing) if PyTorch has no batching rule for an
    operation of the graph.
    """
    K = V[0].shape[0]
    results = []
    try:
        for start in range(0, K, size):
            stop = min(start + size, K)
            hv = torch.autograd.grad(
                [g for g, _ in pairs],
                leaves,
                [V[i][start:stop] for _, i in pairs],
                retain_graph=True,  # a fall-back loop may still need it
                allow_unused=True,
                is_grads_batched=True,
            )
            results.append((start, stop, hv))
            plan.column_passes += 1
    except RuntimeError:
        return False
    for start, stop, hv in results:
        for o, h in zip(out, hv):
            if h is not None:
                o[start:stop].add_(h, alpha=alpha)
    return True


def _hessian_forward_over_reverse(
    loss: ParamFn,
    params: list[Tensor],
    V: list[Tensor],
    out: list[Tensor],
    alpha: float,
    plan: ProductPlan | None = None,
) -> None:
    leaves = _detached_leaves(params)
    for k in range(V[0].shape[0]):
        with (
            torch.enable_grad(),
            fwAD.dual_level(),
            differentiable_attention(),
            # NOTE [forward-mode mse_loss], NOTE [weight norm], NOTE [unfused layers]
            _derivative_fixes(plan, second_order_forward=True),
            _clear_forward_mode_errors(),
        ):
            duals = [fwAD.make_dual(p, plain_tangent(v[k])) for p, v in zip(leaves, V)]
            grads = torch.autograd.grad(loss(*duals), duals, allow_unused=True)
            for o, g in zip(out, grads):
                t = None if g is None else fwAD.unpack_dual(g).tangent
                if t is not None:
                    o[k].add_(t.detach(), alpha=alpha)


_HESSIAN_PASSES = {
    HessianMode.REVERSE_OVER_REVERSE: _hessian_reverse_over_reverse,
    HessianMode.FORWARD_OVER_REVERSE: _hessian_forward_over_reverse,
}


def _probe_hessian_mode(
    loss: ParamFn,
    params: list[Tensor],
    V: list[Tensor],
    plan: ProductPlan,
    out: list[Tensor],
    alpha: float,
) -> None:
    """Time both strategies on this batch, remember the faster one, add its product to ``out``.

    Forward-over-reverse counts only if it runs and agrees with reverse-over-reverse (PyTorch
    lacks or mis-implements some forward-mode derivatives).
    """
    V1 = [v[:1] for v in V]
    seconds: dict[str, float] = {}
    results: dict[HessianMode, list[Tensor] | None] = {}
    for _ in range(2):  # the first round warms up both
        for mode, fn in _HESSIAN_PASSES.items():
            if mode in results and results[mode] is None:
                continue
            start = time.perf_counter()
            column = _output_buffers(params, V1, None)
            try:
                fn(loss, params, V1, column, 1.0, plan)
            except RuntimeError:
                results[mode] = None
                continue
            results[mode] = column
            seconds[mode.value] = time.perf_counter() - start
    reference = results[HessianMode.REVERSE_OVER_REVERSE]
    candidate = results[HessianMode.FORWARD_OVER_REVERSE]
    usable = candidate is not None and all(
        bool(torch.isfinite(b).all())
        and torch.allclose(a, b, rtol=1e-3, atol=1e-5 * max(b.abs().max().item(), 1e-30))
        for a, b in zip(candidate, reference)
    )
    fast = usable and seconds["forward-over-reverse"] < seconds["reverse-over-reverse"]
    plan.hessian_mode = (
        HessianMode.FORWARD_OVER_REVERSE if fast else HessianMode.REVERSE_OVER_REVERSE
    )
    plan.probe_seconds = seconds
    _HESSIAN_PASSES[plan.hessian_mode](loss, params, V, out, alpha, plan)


_MAX_POOLING = ("max_pool", "adaptive_max_pool", "fractional_max_pool")
"""Prefixes of the names of PyTorch's max-pooling functions (1d/2d/3d, with indices)."""
_NORMALISATION_OR_ATTENTION = (
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "local_response_norm",
    "scaled_dot_product_attention",
    "multi_head_attention_forward",
)
"""Names of the functions that keep a model with max-pooling on reverse-over-reverse."""


def hessian_mode_for(functions: set[str]) -> tuple[HessianMode, str]:
    r"""The Hessian strategy for a model that calls the torch functions named ``functions``.

    NOTE [Hessian mode by model]: forward-over-reverse for a model that calls max-pooling and
    no normalisation or attention, reverse-over-reverse for every other model. Measured
    (``python -m benchmarks.hessian_mode``: CPU time, one thread, both modes and curvlinops
    3.0.1's forward-over-reverse interleaved in one run; numbers in ``benchmarks/NOTES.md``):
    reverse-over-reverse is clearly faster on the MLP (forward-over-reverse 1.25-1.29x its
    time), the GPT (1.14-1.16x) and the ResNet with BatchNorm (1.07-1.08x; and on a GPU,
    ResNet-50 with BatchNorm and a max-pooling stem: reverse-over-reverse 6.84 gradients, the
    reference's forward-over-reverse 10.4). On plain CNNs with max-pooling the two modes tie
    (1.00-1.06x), and there reverse-over-reverse was measured at 1.11x and 1.33x the
    reference's time in earlier runs (0.87-0.94x in ours). Taking the reference's own
    strategy where the modes tie makes "not slower than the reference" rest on our
    forward-over-reverse pass being at least as fast as the reference's (0.86-0.96x in every
    run), not on a tie. The choice is a function of the model's operations only, the same on
    every call, instance and process, so products stay bitwise reproducible, unlike the
    timing probe of ``"auto"``.

    Args:
        functions: Names (``__name__``) of the torch functions the batch loss calls
            (:func:`called_functions`).

    Returns:
        The mode and a sentence saying why.
    """
    pooling = sorted(f for f in functions if f.startswith(_MAX_POOLING))
    others = sorted(f for f in functions if f in _NORMALISATION_OR_ATTENTION)
    if not pooling:
        return HessianMode.REVERSE_OVER_REVERSE, "the model calls no max-pooling"
    if others:
        why = f"the model calls {', '.join(pooling)} but also {', '.join(others)}"
        return HessianMode.REVERSE_OVER_REVERSE, why
    why = f"the model calls {', '.join(pooling)} and no normalisation or attention"
    return HessianMode.FORWARD_OVER_REVERSE, why


class _NameSpy(TorchFunctionMode):
    """Records the names of the torch functions called (and changes nothing)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def called_functions(loss: ParamFn, params: list[Tensor]) -> set[str]:
    """Names of the torch functions that one evaluation of ``loss`` calls (no autograd graph).

    Args:
        loss: Maps the parameters (as positional arguments) to the loss.
        params: Parameter values.

    Returns:
        The functions' ``__name__`` (e.g. ``"conv2d"``, ``"max_pool2d"``, ``"linear"``).
    """
    devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
    # the extra evaluation must not draw from the RNG the product's own passes then use
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _NameSpy() as spy:
        loss(*[p.detach() for p in params])
    return spy.names


def _hessian_by_model(
    loss: ParamFn,
    params: list[Tensor],
    V: list[Tensor],
    plan: ProductPlan,
    out: list[Tensor],
    alpha: float,
) -> None:
    """Decide the mode by :func:`hessian_mode_for`, remember it, add its product to ``out``.

    Forward-over-reverse falls back to reverse-over-reverse (for good: the choice is recorded
    in ``plan``) if PyTorch lacks a forward-mode derivative the model needs; the error does
    not depend on the data, so every process makes the same choice.
    """
    mode, reason = hessian_mode_for(called_functions(loss, params))
    if mode == HessianMode.FORWARD_OVER_REVERSE:
        column = _output_buffers(params, V, None)
        try:
            _hessian_forward_over_reverse(loss, params, V, column, alpha, plan)
        except (RuntimeError, NotImplementedError) as e:
            mode = HessianMode.REVERSE_OVER_REVERSE
            reason += f", but forward-over-reverse failed ({type(e).__name__}: {e})"[:300]
        else:
            for o, c in zip(out, column):
                o.add_(c)
    plan.hessian_mode, plan.hessian_reason = mode, reason
    if mode == HessianMode.REVERSE_OVER_REVERSE:
        _hessian_reverse_over_reverse(loss, params, V, out, alpha, plan)


def hessian_matmat(
    loss: ParamFn,
    params: list[Tensor],
    V: list[Tensor],
    *,
    mode: str | HessianMode = HessianMode.REVERSE_OVER_REVERSE,
    plan: ProductPlan | None = None,
    out: list[Tensor] | None = None,
    alpha: float = 1.0,
) -> list[Tensor]:
    r"""Hessian-matrix product :math:`\nabla^2_\theta \mathcal{L} V` (Pearlmutter, 1994).

    Args:
        loss: Maps the parameters (as positional arguments) to a scalar loss.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.
        mode: ``"reverse-over-reverse"``, ``"forward-over-reverse"``, ``"by-model"`` (use
            ``plan.hessian_mode``, deciding it by :func:`hessian_mode_for` if it is not set
            yet), or ``"auto"`` (the same, but probing both modes' time on this batch).
        plan: Where ``"by-model"`` and ``"auto"`` store their choice (required for them).
        out: Accumulators, see :func:`linearized_matmat`.
        alpha: Scale of the product.

    Returns:
        ``out`` (tensor list ``[K, *param_shape]``).

    Raises:
        ValueError: For an unknown mode, or ``"auto"`` / ``"by-model"`` without a plan.
    """
    try:
        mode = HessianMode(mode)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in HessianMode)
        raise ValueError(f"Unknown Hessian mode {mode!r}; use one of {allowed}.") from None
    if mode in (HessianMode.AUTO, HessianMode.BY_MODEL) and plan is None:
        raise ValueError(f"mode={mode.value!r} needs a ProductPlan to remember its choice in.")
    out = _output_buffers(params, V, out)
    if mode in (HessianMode.AUTO, HessianMode.BY_MODEL):
        if plan.hessian_mode is None:
            decide = _probe_hessian_mode if mode == HessianMode.AUTO else _hessian_by_model
            decide(loss, params, V, plan, out, alpha)
            return out
        mode = plan.hessian_mode
    _HESSIAN_PASSES[mode](loss, params, V, out, alpha, plan)
    return out
