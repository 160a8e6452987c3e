r"""The statistics pass: layer inputs from the layer calls, output gradients by one backward.

For every batch of the data loop (:meth:`curvops.risk.EmpiricalRisk.batches`) the pass

1. evaluates the model (a module itself, or a callable with the parameter tensors) while a
   :class:`~curvops.kronecker.uses.UseRecorder` records the input and the output's gradient
   edge of every call of a tracked weight (NOTE [weight uses] of
   :mod:`curvops.kronecker.uses`), and checks that the parameters are used as on the first
   batch, from which :func:`~curvops.kronecker.discovery.discover_layers` found the layers;
2. asks the loss for the per-datum output factors :math:`S = [s_1, \dots, s_K]`
   (:meth:`curvops.losses.LikelihoodLossSpec.shared_output_factors`; ``mc_samples`` columns
   for MC, 1 for the empirical Fisher; for type-2 the ``F`` columns of the loss Hessian's square
   root, split into ``F · P`` columns, one per output position, so that their outer
   products are the block-diagonal loss Hessian: NOTE [output factors] of
   :mod:`curvops.losses.likelihood`; ``C · T`` columns for cross-entropy on ``[N, C, T]``);
3. backpropagates the factors in chunks (``torch.autograd.grad`` with
   ``is_grads_batched=True``, a vmapped backward; a plain backward for one column) to
   every tracked call's output, and, for fallback parameters, computes per-datum gradients
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
from dataclasses import dataclass

import torch
from torch import Tensor

from curvops.kronecker.discovery import run_model
from curvops.kronecker.fallback import per_datum_vjps
from curvops.kronecker.layers import KFACLayer, check_call
from curvops.kronecker.options import FisherType
from curvops.kronecker.uses import SUPPORTED_USES, Call, LayerInputs, UseRecorder
from curvops.risk import Batch, EmpiricalRisk

FACTOR_CHUNK_ELEMENTS = 2**25
"""Largest number of output-gradient entries (all tracked layers) held at once per batch
(NOTE [chunks of output factors]); at least one factor is backpropagated at a time."""


@dataclass
class BatchStatistics:
    """What the statistics pass hands to a consumer for one batch.

    Attributes:
        batch: The batch (its ``weight`` is :math:`w_\\mathbb{B}`).
        inputs: Per tracked layer, the inputs of its calls (detached), a
            :class:`~curvops.kronecker.uses.LayerInputs`: ``(x,)`` for a layer called once,
            one entry per call for a shared weight (NOTE [weight sharing] of
            :mod:`curvops.kronecker.layers`); the layer's ``input_rows`` turns them into rows.
        grad_outputs: Per tracked layer, the output gradients ``[K, *output.shape]`` of its
            call (a tuple of them, one per call, for a layer called several times; the
            layer's ``grad_rows`` turns them into rows), or ``None`` (``forward-only``, or
            a chunk that only carries fallback gradients).
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


class _Router:
    """Assigns the recorded calls of a batch to the layers, checking them against discovery.

    A call belongs to the layer of its weight, and also to the bias-only layer of its bias.
    The structure found by :func:`curvops.kronecker.discovery.discover_layers` on the first
    batch must hold in every batch: every layer used, by calls of its kinds, with its bias.
    """

    def __init__(self, layers: list[KFACLayer], names: list[str]):
        self.layers = layers
        self.names = names
        self.by_weight = {
            layer.weight_index: i
            for i, layer in enumerate(layers)
            if layer.weight_index is not None
        }
        self.by_bias = {
            layer.bias_index: i
            for i, layer in enumerate(layers)
            if layer.weight_index is None and layer.bias_index is not None
        }

    def assign(self, recorder: UseRecorder) -> list[list[int]]:
        """Positions (in ``recorder.calls``) of each layer's calls.

        Raises:
            ValueError: If a parameter is used differently than in the first batch, a layer
                is not used, or a layer's input was changed in place after its call.
        """
        names, layers = self.names, self.layers
        for index, ops in recorder.unsupported.items():
            raise ValueError(
                f"Parameter '{names[index]}' is used by {', '.join(ops)}, which KFAC has no "
                f"Kronecker factors for (supported: {SUPPORTED_USES}). Pass "
                "fallback='diagonal' to use the exact diagonal of the curvature for such "
                "parameters, or remove it from `params` (and if the model uses it so only "
                "for some data, make it use its parameters the same way for all data)."
            )
        per_layer: list[list[int]] = [[] for _ in layers]
        for c, call in enumerate(recorder.calls):
            if call.weight is not None:
                self._add(per_layer, self.by_weight.get(call.weight), c, call, call.weight)
            if call.bias is not None:
                i = self.by_bias.get(call.bias)
                if i is not None:
                    self._add(per_layer, i, c, call, call.bias)
                elif call.weight is None or layers[self.by_weight[call.weight]].bias_index != (
                    call.bias
                ):
                    self._changed(call.bias, call)
        for layer, calls in zip(layers, per_layer):
            if not calls:
                raise ValueError(
                    f"{layer.type_name} '{layer.name}' holds parameters in `params` but was "
                    "not used in the forward pass of a batch (the first batch used it). KFAC "
                    "needs the layer's input in every batch: remove these parameters from "
                    "`params`, or use the layer for all data."
                )
        for call in recorder.modified_inputs():
            index = call.weight if call.weight is not None else call.bias
            raise ValueError(
                f"The input of a call of {call.op} with parameter '{names[index]}' was "
                "changed in place later in the forward pass (e.g. `x += ...` or an in-place "
                "activation on it), so KFAC would read changed values. Use out-of-place "
                "operations on layer inputs."
            )
        return per_layer

    def _add(self, per_layer: list[list[int]], i: int | None, c: int, call, index: int) -> None:
        if i is None:
            self._changed(index, call)
        layer = self.layers[i]
        check_call(call.kind, call.options, f"{layer.type_name} '{layer.name}'")
        if call.kind not in layer.kinds or (
            layer.weight_index is not None
            and layer.bias_index is not None
            and call.bias != layer.bias_index
        ):
            self._changed(index, call)
        per_layer[i].append(c)

    def _changed(self, index: int, call) -> None:
        raise ValueError(
            f"Parameter '{self.names[index]}' is used by {call.op} in a way the first batch "
            "did not use it (another kind of layer call, weight or bias). KFAC finds the "
            "layers from the first batch; make the model use its parameters the same way "
            "for all data."
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
    tracked = [
        i for layer in layers for i in (layer.weight_index, layer.bias_index) if i is not None
    ]
    recorder = UseRecorder(risk.params, tracked)
    router = _Router(layers, risk.param_names)
    loss = risk.loss
    for batch in risk.batches(desc=desc):
        if layers:
            with torch.set_grad_enabled(backward), recorder.recording():
                # the model with the parameter tensors themselves, not a functional call
                # with detached copies: the backward below differentiates w.r.t. the
                # recorded layer outputs only, so no parameter's .grad is touched
                output = run_model(risk, batch.X)
        else:
            with torch.set_grad_enabled(backward):
                output = run_model(risk, batch.X)
        calls = recorder.calls if layers else []
        per_layer = router.assign(recorder) if layers else []
        inputs = [LayerInputs(calls[c] for c in own) for own in per_layer]
        mask = loss.term_mask(batch.y)
        none = [None] * len(layers)
        if not backward:
            recorder.calls = []
            consume(BatchStatistics(batch, inputs, none, [], term_mask=mask))
            continue
        if output.numel() == 0:  # no output entries (sequences of length 0): no gradients
            del output
            recorder.calls = []
            consume(BatchStatistics(batch, inputs, none, [], True, mask))
            continue
        S = loss.shared_output_factors(
            output, batch.y, fisher_type.value, mc_samples=mc_samples, generator=generator
        )
        # the output gradients of one column, and the column itself
        per_column = sum(call.out_numel for call in calls) + output.numel()
        columns = loss.factor_columns(S, split_positions=split_positions)
        first = True
        for _, last, chunk in columns.chunks(FACTOR_CHUNK_ELEMENTS // per_column):
            call_grads = _call_gradients(output, calls, chunk, retain_graph=not last)
            grads = [_layer_gradients(call_grads, own) for own in per_layer]
            consume(BatchStatistics(batch, inputs, grads, [], first, mask))
            first = False
            del grads, call_grads
        del output
        recorder.calls = []
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


def _call_gradients(
    output: Tensor, calls: list[Call], S: Tensor, *, retain_graph: bool = False
) -> list[Tensor]:
    """Output gradients ``[K, *out_shape]`` of every call for the ``K`` factors ``S``.

    One backward to the gradient edges of all calls' outputs (NOTE [weight uses]); a call
    output the model output does not depend on gets zero gradients.
    """
    reachable = [c for c, call in enumerate(calls) if call.edge is not None]
    computed = (
        _backpropagate(output, [calls[c].edge for c in reachable], S, retain_graph=retain_graph)
        if reachable
        else []
    )
    grads: list[Tensor | None] = [None] * len(calls)
    for c, g in zip(reachable, computed):
        grads[c] = g
    return [
        torch.zeros(S.shape[0], *call.out_shape, dtype=call.out_dtype, device=call.x.device)
        if g is None
        else g
        for call, g in zip(calls, grads)
    ]


def _layer_gradients(call_grads: list[Tensor], own: list[int]) -> Tensor | tuple[Tensor, ...]:
    """A layer's output gradients: a tensor for one call, a tuple for several."""
    if len(own) == 1:
        return call_grads[own[0]]
    return tuple(call_grads[c] for c in own)


def _backpropagate(
    output: Tensor, layer_outputs: list, S: Tensor, *, retain_graph: bool = False
) -> list[Tensor | None]:
    """Backpropagate the ``K`` factors ``S`` to the layer outputs in one backward.

    ``K > 1`` factors go through one vectorised backward (``is_grads_batched``); a single
    factor (``mc`` with one sample, ``empirical``) through a plain backward, which skips the
    vectorisation's overhead.

    Args:
        output: The model output.
        layer_outputs: Gradient edges (or tensors) of the layer outputs.
        S: The factors ``[K, *output.shape]``.
        retain_graph: Keep the graph for another backward.

    Returns:
        The gradients ``[K, *shape]`` per layer output, ``None`` where the output does not
        depend on it.
    """
    if not output.requires_grad:
        return [None] * len(layer_outputs)
    single = S.shape[0] == 1
    computed = torch.autograd.grad(
        output,
        layer_outputs,
        grad_outputs=S[0] if single else S,
        is_grads_batched=not single,
        allow_unused=True,
        retain_graph=retain_graph,
    )
    return [None if g is None else (g.unsqueeze(0) if single else g) for g in computed]


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
