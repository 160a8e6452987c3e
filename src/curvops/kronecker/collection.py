r"""The statistics pass: layer inputs by forward hooks, output gradients by one batched backward.

For every batch of the data loop (:meth:`curvops.risk.EmpiricalRisk.batches`) the pass

1. evaluates the model (the module itself, with its parameters) while forward hooks record
   each tracked layer's input and output (and count the calls, to reject layers used twice);
2. asks the loss for the per-datum output factors :math:`S = [s_1, \dots, s_K]`
   (:meth:`curvops.losses.LikelihoodLossSpec.shared_output_factors`; ``mc_samples`` columns
   for MC, 1 for the empirical Fisher; for type-2 the ``F`` columns of the loss Hessian's square
   root, split into ``F · P`` columns, one per output position, so that their outer
   products are the block-diagonal loss Hessian: NOTE [output factors] of
   :mod:`curvops.losses.likelihood`; ``C · T`` columns for cross-entropy on ``[N, C, T]``);
3. backpropagates the factors in chunks (``torch.autograd.grad`` with
   ``is_grads_batched=True``, a vmapped backward; a plain backward for one column) to
   every tracked layer's output, and, for fallback parameters, computes per-datum gradients
   of the same (or, see ``fallback_split_positions``, the split) columns;
4. hands inputs and output gradients to a consumer (the KFAC factors, or the EKFAC
   eigenvalue correction), which multiplies by the batch weight :math:`w_\mathbb{B}`.

The ``forward-only`` type skips steps 2-3. Every fisher type shares this code path.

NOTE [chunks of output factors]: the output gradients of all :math:`K` factors at once take
:math:`K` times the memory of the layer outputs (a 256-token vocabulary: 256 gradients per
layer, times the positions for type-2). Factors are therefore formed and backpropagated in
chunks whose columns and output gradients stay below :data:`FACTOR_CHUNK_ELEMENTS` entries
(split columns are only ever formed chunk by chunk; the chunks go through the same graph,
retained between chunks: the same work as one vectorised backward), and the consumer sees
one :class:`BatchStatistics` per chunk; every consumer sums over the factors, and per-batch
statistics of the inputs are added only with the first chunk (``new_batch``).

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
            ``None`` (``forward-only``, or a chunk that only carries fallback gradients).
        fallback_grads: Per fallback parameter, per-datum gradients ``[K, N, *shape]``
            (empty if none were requested).
        new_batch: Whether this is the batch's first chunk of output factors (NOTE [chunks of
            output factors]): per-batch statistics of the inputs are added only then.
        term_mask: Which loss terms of the batch count (``False`` at ignored targets),
            ``[N, *positions]``, or ``None`` if all do.
    """

    batch: Batch
    inputs: list[tuple]
    grad_outputs: list[Tensor | None]
    fallback_grads: list[Tensor]
    new_batch: bool = True
    term_mask: Tensor | None = None


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
    split_positions: bool = False,
    fallback_split_positions: bool | None = None,
    desc: str = "KFAC statistics",
) -> None:
    """Run one pass over the data and feed each batch's layer statistics to ``consume``.

    Args:
        risk: The data loop.
        layers: The tracked layers.
        consume: Called per batch and chunk of factors with its :class:`BatchStatistics`.
        fisher_type: Which output factors to backpropagate (none for ``forward-only``).
        mc_samples: Number of Monte-Carlo samples (``mc`` only).
        seed: Seed of the pass's private generator.
        fallback_indices: Positions of parameters needing per-datum gradients (fallback).
        split_positions: Split every output factor into one factor per output position
            for the layers' output gradients (NOTE [output factors] of
            :mod:`curvops.losses.likelihood`).
        fallback_split_positions: The same for the fallback's per-datum gradients (default:
            ``split_positions``).
        desc: Progress bar description.
    """
    fallback_indices = fallback_indices or []
    if fallback_split_positions is None:
        fallback_split_positions = split_positions
    backward = fisher_type != FisherType.FORWARD_ONLY
    # NOTE [MC seeding across ranks]
    generator = torch.Generator(device=risk.device).manual_seed(risk.group.rank_seed(seed))
    recorder = _Recorder(layers)
    loss = risk.loss
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
            mask = loss.term_mask(batch.y)
            none = [None] * len(layers)
            if not backward:
                recorder.outputs = {}
                consume(BatchStatistics(batch, inputs, none, [], term_mask=mask))
                continue
            S = loss.shared_output_factors(
                output, batch.y, fisher_type.value, mc_samples=mc_samples, generator=generator
            )
            layer_outputs = [recorder.outputs[i] for i in range(len(layers))]
            # the output gradients of one column, and the column itself
            per_column = sum(o.numel() for o in layer_outputs) + output.numel()
            columns = loss.factor_columns(S, split_positions=split_positions)
            first = True
            for _, last, chunk in columns.chunks(FACTOR_CHUNK_ELEMENTS // per_column):
                grads = _backpropagate(output, layer_outputs, chunk, retain_graph=not last)
                consume(BatchStatistics(batch, inputs, grads, [], first, mask))
                first = False
                del grads
            del output, layer_outputs
            recorder.outputs = {}
            if fallback_indices:
                detached = [p.detach() for p in risk.params]
                numel = sum(risk.params[i].numel() for i in fallback_indices)
                per_column = batch.batch_size * numel + S[0].numel()
                columns = loss.factor_columns(S, split_positions=fallback_split_positions)
                for _, _, chunk in columns.chunks(FACTOR_CHUNK_ELEMENTS // per_column):
                    fallback_grads = per_datum_vjps(
                        risk.forward, detached, fallback_indices, batch.X, chunk
                    )
                    consume(BatchStatistics(batch, inputs, none, fallback_grads, first, mask))
                    first = False
            if first:  # no column at all: the batch's inputs still count
                consume(BatchStatistics(batch, inputs, none, [], True, mask))


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
    r"""Split class-axis output factors ``[K, N, C, *positions]`` into one factor per position.

    Kept for code written against earlier versions, whose type-2 cross-entropy factors were
    shared by all positions: :meth:`curvops.losses.LikelihoodLossSpec.output_factors` now
    returns split columns already (NOTE [output factors]), which this function returns
    unchanged up to their order; the data loop forms split columns in chunks with
    :meth:`curvops.losses.LikelihoodLossSpec.factor_columns` instead. Masking each column to
    one position :math:`p` (axes ``2:`` flattened) removes the cross-position terms
    :math:`J_t^\top S_t S_{t'}^\top J_{t'}` of shared columns; columns that are zero at every
    datum are dropped.

    Args:
        S: Output factors ``[K, N, *output.shape[1:]]`` with the class axis at 2.

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
