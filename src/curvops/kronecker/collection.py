r"""The statistics pass: layer inputs by forward hooks, output gradients by one batched backward.

For every batch of the data loop (:meth:`curvops.risk.EmpiricalRisk.batches`) the pass

1. evaluates the model (the module itself, with its parameters) while forward hooks record
   each tracked layer's input and output (and count the calls, to reject layers used twice);
2. asks the loss for the per-datum output factors :math:`S = [s_1, \dots, s_K]`
   (:meth:`curvops.losses.LossSpec.output_factors`; ``K = C`` for type-2 with ``C``
   classes, ``mc_samples`` for MC, 1 for the empirical Fisher);
3. backpropagates all :math:`K` factors at once (``torch.autograd.grad`` with
   ``is_grads_batched=True``, a vmapped backward; a plain backward for :math:`K = 1`) to
   every tracked layer's output;
4. hands inputs and output gradients to a consumer (the KFAC factors, or the EKFAC
   eigenvalue correction), which multiplies by the batch weight :math:`w_\mathbb{B}`.

The ``forward-only`` type skips steps 2-3. Every fisher type shares this code path.

NOTE [chunks of output factors]: the output gradients of all :math:`K` factors at once take
:math:`K` times the memory of the layer outputs (a 256-token vocabulary: 256 gradients per
layer). Factors are therefore backpropagated in chunks whose output gradients stay below
:data:`FACTOR_CHUNK_ELEMENTS` entries (through the same graph, retained between chunks: the
same work as one vectorised backward), and the consumer sees one :class:`BatchStatistics` per
chunk; every consumer sums over the factors, and per-batch statistics of the inputs are added
only with the first chunk (``new_batch``).

NOTE [MC seeding across ranks] of :mod:`curvops.risk.distributed` applies: each pass
re-seeds a private generator with the rank's seed, so repeated passes (EKFAC's second pass)
draw the same would-be labels and the global RNG is never touched. The caller wraps the pass
in :meth:`curvops.risk.EmpiricalRisk.partial_sums`, which sums the statistics across
processes (and makes every rank raise if one fails).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from curvops.kronecker.fallback import per_datum_vjps
from curvops.kronecker.layers import KFACLayer
from curvops.kronecker.options import FisherType
from curvops.risk import Batch, EmpiricalRisk

FACTOR_CHUNK_ELEMENTS = 2**25
"""Largest number of output-gradient entries (all tracked layers) held at once per batch
(NOTE [chunks of output factors]); at least one factor is backpropagated at a time."""


@dataclass
class BatchStatistics:
    """What the statistics pass hands to a consumer for one batch.

    Attributes:
        batch: The batch (its ``weight`` is :math:`w_\\mathbb{B}`).
        inputs: Per tracked layer, its positional inputs (detached).
        grad_outputs: Per tracked layer, the output gradients ``[K, *output.shape]``, or
            ``None`` for ``forward-only``.
        fallback_grads: Per fallback parameter, per-datum gradients ``[K, N, *shape]``
            (empty if none were requested).
        new_batch: Whether this is the batch's first chunk of output factors (NOTE [chunks of
            output factors]): per-batch statistics of the inputs are added only then.
    """

    batch: Batch
    inputs: list[tuple]
    grad_outputs: list[Tensor | None]
    fallback_grads: list[Tensor]
    new_batch: bool = True


class _Recorder:
    """Forward hooks recording each tracked layer's inputs and output during one forward."""

    def __init__(self, layers: list[KFACLayer]):
        self.layers = layers
        self.active = False
        self.inputs: dict[int, tuple] = {}
        self.outputs: dict[int, Tensor] = {}
        self.calls: dict[int, int] = {}

    def _hook(self, index: int) -> Callable:
        def hook(module, args, output):
            if not self.active:
                return None
            self.calls[index] = self.calls.get(index, 0) + 1
            self.inputs[index] = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            self.outputs[index] = output
            return None

        return hook

    @contextmanager
    def installed(self):
        handles = [
            layer.module.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def recording(self):
        self.inputs, self.outputs, self.calls = {}, {}, {}
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def check_calls(self) -> None:
        for i, layer in enumerate(self.layers):
            calls = self.calls.get(i, 0)
            if calls == 0:
                raise ValueError(
                    f"{layer.type_name} '{layer.name}' holds parameters in `params` but was "
                    "not called during the forward pass (its weights may be used directly, "
                    "e.g. by nn.MultiheadAttention, or the layer is unused). KFAC needs to see "
                    "the layer's input: remove these parameters from `params`."
                )
            if calls > 1:
                raise ValueError(
                    f"{layer.type_name} '{layer.name}' was called {calls} times in one "
                    "forward pass. KFAC supports layers applied once per forward pass (a "
                    "layer reused across calls, e.g. a recurrent cell or tied application, "
                    "has no Kronecker structure here). Remove its parameters from `params`."
                )


def statistics_pass(
    risk: EmpiricalRisk,
    layers: list[KFACLayer],
    consume: Callable[[BatchStatistics], None],
    *,
    fisher_type: FisherType,
    mc_samples: int,
    seed: int,
    fallback_indices: list[int] | None = None,
    separate_positions: bool = False,
    desc: str = "KFAC statistics",
) -> None:
    """Run one pass over the data and feed each batch's layer statistics to ``consume``.

    Args:
        risk: The data loop.
        layers: The tracked layers.
        consume: Called once per batch with its :class:`BatchStatistics`.
        fisher_type: Which output factors to backpropagate (none for ``forward-only``).
        mc_samples: Number of Monte-Carlo samples (``mc`` only).
        seed: Seed of the pass's private generator.
        fallback_indices: Positions of parameters needing per-datum gradients (fallback).
        separate_positions: Split every output factor into one factor per output position
            (see :func:`separate_output_positions`).
        desc: Progress bar description.
    """
    fallback_indices = fallback_indices or []
    backward = fisher_type != FisherType.FORWARD_ONLY
    # NOTE [MC seeding across ranks]
    generator = torch.Generator(device=risk.device).manual_seed(risk.group.rank_seed(seed))
    recorder = _Recorder(layers)
    with recorder.installed():
        for batch in risk.batches(desc=desc):
            with torch.set_grad_enabled(backward), recorder.recording():
                # the module itself, not a functional call with detached parameter copies
                # (which re-parametrises the module on every batch): the backward below
                # differentiates w.r.t. the recorded layer outputs only, so no parameter's
                # .grad is touched
                output = risk.module(batch.X)
            recorder.check_calls()
            inputs = [recorder.inputs[i] for i in range(len(layers))]
            if not backward:
                recorder.outputs = {}
                consume(BatchStatistics(batch, inputs, [None] * len(layers), []))
                continue
            S = risk.loss.output_factors(
                output, batch.y, fisher_type.value, mc_samples=mc_samples, generator=generator
            )
            if separate_positions:
                S = separate_output_positions(S)
            layer_outputs = [recorder.outputs[i] for i in range(len(layers))]
            per_factor = max(1, sum(o.numel() for o in layer_outputs))
            step = max(1, FACTOR_CHUNK_ELEMENTS // per_factor)
            for start in range(0, S.shape[0], step):
                chunk = S[start : start + step]
                last = start + step >= S.shape[0]
                grads = _backpropagate(output, layer_outputs, chunk, retain_graph=not last)
                fallback_grads: list[Tensor] = []
                if fallback_indices:
                    detached = [p.detach() for p in risk.params]
                    fallback_grads = per_datum_vjps(
                        risk.forward, detached, fallback_indices, batch.X, chunk
                    )
                consume(BatchStatistics(batch, inputs, grads, fallback_grads, start == 0))
                del grads, fallback_grads
            del output, layer_outputs
            recorder.outputs = {}


def _backpropagate(
    output: Tensor, layer_outputs: list[Tensor], S: Tensor, *, retain_graph: bool = False
) -> list[Tensor]:
    """Backpropagate the ``K`` factors ``S`` to every layer output in one backward.

    ``K > 1`` factors go through one vectorised backward (``is_grads_batched``); a single
    factor (``mc`` with one sample, ``empirical``) through a plain backward, which skips the
    vectorisation's overhead.
    """
    needs = [i for i, o in enumerate(layer_outputs) if o.requires_grad]
    grads: list[Tensor | None] = [None] * len(layer_outputs)
    if needs and output.requires_grad:
        single = S.shape[0] == 1
        computed = torch.autograd.grad(
            output,
            [layer_outputs[i] for i in needs],
            grad_outputs=S[0] if single else S,
            is_grads_batched=not single,
            allow_unused=True,
            retain_graph=retain_graph,
        )
        for i, g in zip(needs, computed):
            grads[i] = None if g is None else (g.unsqueeze(0) if single else g)
    # a layer output the model output does not depend on gets zero gradients
    return [
        torch.zeros(S.shape[0], *o.shape, dtype=o.dtype, device=o.device) if g is None else g
        for o, g in zip(layer_outputs, grads)
    ]


def separate_output_positions(S: Tensor) -> Tensor:
    r"""Split output factors ``[K, N, C, *positions]`` into one factor per position.

    For type-2 factors of a loss with extra output axes, a column :math:`s_k` may hold the
    :math:`k`-th column of *every* position's Hessian square root at once
    (:meth:`curvops.losses.LossSpec.output_factors`; cross-entropy, class axis 1). Then
    :math:`\sum_k s_k s_k^\top` equals the loss Hessian on each position's block, but a
    per-datum quantity *squared after backpropagation*, :math:`\sum_k (J^\top s_k)^2`,
    picks up spurious cross-position terms :math:`J_t^\top S_t S_{t'}^\top J_{t'}`. Masking
    each column to one position :math:`p` (axes ``2:`` flattened) removes them; columns that
    are zero at every datum are dropped (elementwise losses already give one column per
    entry, so nothing is added for them).

    Args:
        S: Output factors ``[K, N, *output.shape[1:]]``.

    Returns:
        Factors ``[K', N, *output.shape[1:]]`` each supported on one position.
    """
    if S.ndim <= 3:
        return S
    K, N, C = S.shape[:3]
    P = S[0, 0, 0].numel()
    eye = torch.eye(P, dtype=S.dtype, device=S.device)
    split = S.reshape(K, 1, N, C, P) * eye.reshape(1, P, 1, 1, P)
    split = split.reshape(K * P, N, *S.shape[2:])
    return split[split.reshape(K * P, -1).ne(0).any(dim=1)]
