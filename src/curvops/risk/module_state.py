"""The model's own state during data passes: no BatchNorm in train mode, buffers untouched.

NOTE [module buffers]: an operator represents a fixed matrix of the *caller's* model, so no
pass over the data may change the model. Two things could:

* BatchNorm in training mode normalises with statistics of the current batch, so a datum's
  output depends on the other data of its batch: the curvature then depends on how the data
  are batched, and the per-datum structure every operator assumes (KFAC's factors, the
  Fishers' per-datum gradients) does not exist. Every operator refuses it at construction
  (:func:`refuse_batchnorm_in_training`) and asks for ``model.eval()``.
* A forward pass may update buffers in place: running statistics of normalisation layers in
  training mode (e.g. ``InstanceNorm`` with ``track_running_stats=True``), step counters or
  moving averages of custom modules. :class:`BufferGuard` snapshots the module's buffers when
  a pass starts and restores any buffer a batch changed (detected by its version counter,
  so a pass that changes nothing copies nothing), so every batch sees the caller's buffers
  and the caller gets them back unchanged. Inside ``torch.func`` transforms PyTorch forbids
  such updates; :func:`explained_buffer_updates` turns its message into one that names the
  cause.

``model.training`` is never changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def refuse_batchnorm_in_training(
    module: nn.Module | None, owner: str, named_modules: list | None = None
) -> None:
    """Raise if a BatchNorm layer of ``module`` is in training mode (NOTE [module buffers]).

    Args:
        module: The model (``None`` for a plain function, which cannot be inspected).
        owner: The operator, for the message.
        named_modules: ``list(module.named_modules())`` if the caller has it already (the
            checks run for every operator, and one walk of the model serves all three).

    Raises:
        ValueError: Naming the first BatchNorm layer in training mode.
    """
    if module is None:
        return
    for name, sub in module.named_modules() if named_modules is None else named_modules:
        if isinstance(sub, _BatchNorm) and sub.training:
            raise ValueError(
                f"{type(sub).__name__} '{name or '<root>'}' is in training mode, which couples "
                f"the data of a batch; {owner} assumes independent data. Call model.eval() "
                "first."
            )


def refuse_in_place_parameter_updates(
    module: nn.Module | None, owner: str, named_modules: list | None = None
) -> None:
    """Raise for layers that change their own parameters during the forward pass.

    NOTE [in-place parameter updates]: ``nn.Embedding(max_norm=...)`` (and
    ``nn.EmbeddingBag``) renormalise the looked-up rows of their weight *in place* in every
    forward pass (``torch.embedding_renorm_``). An operator's passes would change the
    caller's weights (measured: by up to 1.98 in one GGN), and the matrix would not be the
    one of the model the caller holds. Refused for every operator, with the fix.

    Args:
        module: The model (``None`` for a plain function, which cannot be inspected).
        owner: The operator, for the message.
        named_modules: ``list(module.named_modules())`` if the caller has it already (the
            checks run for every operator, and one walk of the model serves all three).

    Raises:
        NotImplementedError: Naming the first such layer.
    """
    if module is None:
        return
    for name, sub in module.named_modules() if named_modules is None else named_modules:
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.max_norm is not None:
            raise NotImplementedError(
                f"{type(sub).__name__} '{name or '<root>'}' uses max_norm={sub.max_norm}: it "
                "renormalises rows of its weight in place in every forward pass, so "
                f"{owner}'s passes would change your model's weights. Renormalise once "
                "yourself (`with torch.no_grad(): torch.embedding_renorm_(emb.weight, ids, "
                "max_norm, 2.0)` for the ids of your data), then set `emb.max_norm = None`."
            )


def refuse_backward_hooks(
    module: nn.Module | None, owner: str, named_modules: list | None = None
) -> None:
    """Raise for backward hooks, which ``torch.func`` transforms cannot run.

    NOTE [module hooks]: forward hooks and forward pre-hooks are part of the model's forward
    pass and run in every pass of an operator (the matrix is that of the hooked model, as in
    the dense references; a hook that stores outputs receives the passes' tensors). Backward
    hooks (``register_full_backward_hook``, ``register_full_backward_pre_hook``, and their
    global versions) wrap the module in an ``autograd.Function`` that ``torch.func`` cannot
    transform; PyTorch failed with a message about ``setup_context``. Refused, with the fix.

    Args:
        module: The model (``None`` for a plain function, which cannot be inspected).
        owner: The operator, for the message.
        named_modules: ``list(module.named_modules())`` if the caller has it already (the
            checks run for every operator, and one walk of the model serves all three).

    Raises:
        ValueError: Naming the first module with a backward hook.
    """
    if module is None:
        return
    from torch.nn.modules import module as module_globals

    fix = (
        "Remove it while using curvops (`handle.remove()` on the handle the register call "
        "returned) and register it again afterwards."
    )
    if module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks:
        raise ValueError(
            f"A global module backward hook is registered (torch.nn.modules.module."
            f"register_module_full_backward_hook or ..._pre_hook); {owner}'s passes use "
            f"torch.func transforms, which cannot run backward hooks. {fix}"
        )
    for name, sub in module.named_modules() if named_modules is None else named_modules:
        if sub._backward_hooks or sub._backward_pre_hooks:
            raise ValueError(
                f"{type(sub).__name__} '{name or '<root>'}' has a backward hook "
                f"(register_full_backward_hook or register_full_backward_pre_hook); {owner}'s "
                f"passes use torch.func transforms, which cannot run backward hooks. {fix}"
            )


class BufferGuard:
    """Context that snapshots a module's buffers on entry and restores them on exit.

    See NOTE [module buffers]. Entering copies every buffer once; :meth:`restore` (also run
    on exit) copies back only buffers whose version counter moved since the snapshot or the
    last restore.

    Args:
        module: The model, or ``None`` (then the guard does nothing).
    """

    def __init__(self, module: nn.Module | None):
        self._module = module
        self._entries: list[tuple[Tensor, Tensor, int]] = []

    def __enter__(self) -> BufferGuard:
        buffers = [] if self._module is None else list(self._module.buffers())
        self._entries = [(b, b.detach().clone(), b._version) for b in buffers]
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        """Copy back every buffer changed since the snapshot (or the last restore)."""
        for i, (buffer, saved, version) in enumerate(self._entries):
            if buffer._version != version:
                buffer.detach().copy_(saved)
                self._entries[i] = (buffer, saved, buffer._version)


@contextmanager
def explained_buffer_updates(owner: str) -> Iterator[None]:
    """Explain PyTorch's refusal to update a buffer inside a ``torch.func`` transform.

    Args:
        owner: The operator, for the message.

    Raises:
        RuntimeError: Naming the cause and the fix (NOTE [module buffers]); other errors pass
            unchanged.
    """
    try:
        yield
    except RuntimeError as e:
        if "mutate a captured Tensor" not in str(e):
            raise
        raise RuntimeError(
            f"{owner}: the model updates a tensor in place during its forward pass (e.g. a "
            "counter or moving-average buffer of a custom module), which the autodiff "
            "transforms of curvops (torch.func) forbid. Call model.eval() if the update "
            "happens only in training mode, or make the forward pass free of in-place updates "
            "of buffers (curvops restores buffers after every batch anyway, NOTE [module "
            "buffers])."
        ) from e


_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
)  # fmt: skip


def _row_wise_module(module: nn.Module) -> bool:
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    kind = type(module)
    if kind is nn.Sequential:
        return all(_row_wise_module(child) for child in module)
    if kind is nn.Linear or kind in _ELEMENTWISE:
        return True
    if kind is nn.Dropout:
        return not module.training
    if kind is nn.Flatten:
        return module.start_dim >= 1
    return False


def row_wise(model: nn.Module | None) -> bool:
    """Whether each output row of ``model`` provably depends on its input row alone.

    Such a model is ``nn.Linear``, an element-wise activation, ``nn.Identity``,
    ``nn.Dropout`` in evaluation mode or ``nn.Flatten`` keeping the leading axis, alone or
    nested in ``nn.Sequential`` (exact types: a subclass may override ``forward``), with no
    forward hooks anywhere: output row :math:`n` depends on input row :math:`n` alone, each
    parameter is used by its own layer only, and a forward pass draws no random numbers.
    ``False`` whenever in doubt (custom modules, hooks, callables). Used by NOTE [row-wise
    models] of :mod:`curvops.curvature.diagonal_linear` and NOTE [RNG isolation of plain
    data] of :mod:`curvops.risk.empirical_risk`.
    """
    if model is None:
        return False
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    return _row_wise_module(model)
