r"""The one loop over the data: binding of model, loss, parameters and data.

Every data-dependent operator in ``curvops`` iterates over data through
:meth:`EmpiricalRisk.batches`; no operator writes its own loop.

NOTE [batch weights]: the empirical risk is
:math:`\mathcal{L}_\mathbb{D} = \sum_\mathbb{B} (R_\mathbb{D}/R_\mathbb{B}) \mathcal{L}_\mathbb{B}`
(paper eq. (7)). Any quantity linear in the batch loss (gradient, Hessian, GGN, Fisher, KFAC
statistics) is computed per batch *from the batch loss* and multiplied by the batch weight
:math:`w_\mathbb{B} = R_\mathbb{D}/R_\mathbb{B}`, which is :math:`Z_\mathbb{B}/Z_\mathbb{D}` for
``reduction="mean"`` and ``1`` for ``reduction="sum"``. :math:`Z_\mathbb{B}` is PyTorch's own
normaliser of the batch's mean (NOTE [loss scaling] in :mod:`curvops.losses.base`: the number
of loss terms, of non-ignored targets, or the sum of their class weights) and
:math:`Z_\mathbb{D} = \sum_\mathbb{B} Z_\mathbb{B}` the data set's, counted once per operator
at construction by a pass over the *targets* (no forward pass; summed across processes, NOTE
[data parallelism]). Hence batching never changes the matrix: uneven batches, padding
(``ignore_index``), class weights and sequences whose length differs between batches give the
same operator as one batch holding all data. A batch whose loss terms are all ignored
(:math:`Z_\mathbb{B} = 0`, a ``nan`` batch loss in PyTorch) contributes nothing and is
skipped. For a loss whose normaliser ``curvops`` does not know (a custom loss module), it
counts data, which is exact if every datum has the same number of loss terms; an error is
raised if the targets' entries per datum differ between batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from curvops._integer_options import check_positive_int
from curvops.losses import LossSpec, make_loss_spec
from curvops.risk.concurrency import DATA_PASS_LOCK
from curvops.risk.data_checks import (
    check_batch_dtypes,
    check_data_container,
    check_loss_tensors,
    unpack_batch,
)
from curvops.risk.distributed import ProcessGroupHandle, check_rank_summaries
from curvops.risk.finite import require_finite
from curvops.risk.module_state import (
    BufferGuard,
    explained_buffer_updates,
    refuse_backward_hooks,
    refuse_batchnorm_in_training,
    refuse_in_place_parameter_updates,
    row_wise,
)

_SUMMARY_LABELS = {
    "shapes": "parameter shapes",
    "dtype": "parameter dtypes",
    "loss": "loss functions",
    "reduction": "loss reductions",
}


@contextlib.contextmanager
def _explained_missing_keys(X: Any, reader: str) -> Iterator[None]:
    """Explain a ``KeyError`` for a key missing from a mapping input batch.

    Raises:
        KeyError: Naming the missing key and the keys the batch has.
    """
    try:
        yield
    except KeyError as e:
        key = e.args[0] if e.args else None
        if not isinstance(X, Mapping) or key in X:
            raise
        raise KeyError(
            f"{reader} reads the input key {key!r}, but this batch's input mapping has the "
            f"keys {sorted(map(str, X.keys()))}. Make every batch's X hold the keys the model "
            "(and batch_size_fn) read."
        ) from e


def refuse_inference_mode(owner: str) -> None:
    """Raise a clear error inside ``torch.inference_mode()``.

    NOTE [inference mode]: every pass over the data differentiates the model (products,
    gradients, KFAC's factors), and tensors made under ``torch.inference_mode()`` can never
    take part in automatic differentiation, so PyTorch failed deep inside a product with
    "element 0 of tensors does not require grad" or "Inference tensors do not track version
    counter". ``torch.no_grad()`` is fine: the passes enable gradients where they need them
    and return detached results. Checked when an operator is built and at the start of
    every data pass (a product of a structured operator with factors already computed
    needs no pass and works in inference mode).

    Args:
        owner: The operator's name, for the message.

    Raises:
        RuntimeError: If inference mode is enabled.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{owner} was used inside torch.inference_mode(), which forbids the automatic "
            "differentiation its passes over the data need. Build and apply curvops operators "
            "outside inference mode; torch.no_grad() is fine (curvops enables gradients "
            "internally and returns detached results)."
        )


@dataclass
class Batch:
    """One batch of the data loop.

    Attributes:
        X: Inputs on the operator's device (a tensor or a mapping of tensors).
        y: Targets on the operator's device.
        batch_size: Number of data in the batch.
        weight: The batch weight :math:`R_\\mathbb{D}/R_\\mathbb{B}` (NOTE [batch weights]).
    """

    X: Any
    y: Any
    batch_size: int
    weight: float


def _to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors of a mapping (e.g. a BatchEncoding), to ``device``."""
    if isinstance(x, Tensor) or (isinstance(x, Mapping) and callable(getattr(x, "to", None))):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class EmpiricalRisk:
    """Binds ``(model_func, loss_func, params, data)`` and owns the loop over the data.

    Args:
        model_func: An ``nn.Module`` (called as ``model(X)``), or a callable
            ``(params, X) -> output`` receiving the parameters as a dict (if ``params`` is a
            dict) or a list.
        loss_func: Loss module with ``reduction`` ``"mean"`` or ``"sum"``, or ``None`` for
            operators that need no loss (Jacobians).
        params: The parameters the curvature is taken with respect to: a list of tensors
            (any subset of the model's parameters, any order) or a dict name -> tensor.
        data: A re-iterable of ``(X, y)`` batches (a list, a ``DataLoader``).
        progressbar: Show a tqdm progress bar over batches.
        num_data: Number of data in ``data``, a positive integer (counted with one pass over
            ``data`` if ``None``); when distributed, the size of this process's shard (the
            total is summed across processes). With ``reduction="mean"`` the construction
            passes over the data once anyway, to count the loss normaliser from the targets
            (NOTE [batch weights]).
        batch_size_fn: Maps ``X`` to its batch size; required if ``X`` is a mapping.
        process_group: ``torch.distributed`` process group whose ranks each hold a shard of
            the data (default ``None``: the world group if ``torch.distributed`` is
            initialised; ``True``: the world group, required); pass ``False`` to opt out and
            treat the local data as everything. See NOTE [data parallelism] in
            :mod:`curvops.risk.distributed`.
        owner: Name of the operator using the loop, for error messages.

    Attributes:
        num_data: Number of data (all processes).
        normaliser: :math:`Z_\\mathbb{D}`, the ``"mean"`` normaliser of the whole data set
            (all processes; ``0`` for ``"sum"``), NOTE [batch weights].

    Raises:
        ValueError: For parameters that are not usable, empty data, a bad data format
            (e.g. ``data=(X, y)`` instead of ``[(X, y)]``), a non-positive ``num_data``, or
            BatchNorm in training mode (NOTE [module buffers]); when distributed, also for
            an empty shard on any rank or parameter shapes, dtypes or losses that differ
            between ranks (raised on every rank); for ``"mean"``, if every target is
            ignored, or if a custom loss gets targets with different entries per datum (see
            NOTE [batch weights]).
        TypeError: For a one-shot iterator as data, a non-integer ``num_data``, or data or
            loss tensors whose dtype differs from the parameters' (NOTE [data dtypes and
            devices]).
    """

    def __init__(
        self,
        model_func: nn.Module | Callable,
        loss_func: nn.Module | None,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable,
        *,
        progressbar: bool = False,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        process_group: Any = None,
        owner: str = "EmpiricalRisk",
    ):
        self.owner = owner
        refuse_inference_mode(owner)  # NOTE [inference mode]
        self.model_func = model_func
        self.module = model_func if isinstance(model_func, nn.Module) else None
        if self.module is None and not callable(model_func):
            raise TypeError(
                f"model_func must be an nn.Module or a callable (params, X) -> output, got "
                f"{type(model_func)}."
            )
        named = None if self.module is None else list(self.module.named_modules())
        refuse_batchnorm_in_training(self.module, owner, named)  # NOTE [module buffers]
        refuse_in_place_parameter_updates(self.module, owner, named)
        refuse_backward_hooks(self.module, owner, named)  # NOTE [module hooks]
        if num_data is not None:
            num_data = check_positive_int(num_data, "num_data")
        self.loss_func = loss_func
        self.loss: LossSpec | None = None if loss_func is None else make_loss_spec(loss_func)
        self.batch_size_fn = batch_size_fn
        self.progressbar = progressbar
        self.group = ProcessGroupHandle(process_group)
        # every rank binds and counts its shard, then all ranks compare (NOTE [data parallelism])
        summaries = self.group.gather_objects(
            lambda: self._bind(params, data, num_data), what="Setting up the empirical risk"
        )
        if self.group.active:
            check_rank_summaries(summaries, _SUMMARY_LABELS)
        elif self.local_num_data <= 0:
            raise ValueError("The data is empty: it yields no data points.")
        self.num_data = sum(int(s["num_data"]) for s in summaries)
        self.normaliser = sum(float(s["normaliser"]) for s in summaries)
        if self._reduction == "mean":
            self._check_normaliser(summaries)

    def _bind(self, params, data: Iterable, num_data: int | None) -> dict[str, Any]:
        """Bind parameters and data, count this shard; return a summary for the other ranks."""
        self.params, self.param_names, self._params_as_dict = self._bind_params(params)
        self._param_ids = {id(p) for p in self.params}
        self._tensor_slots: list[tuple[str, dict, str]] | None = None  # NOTE [fixed parameters]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.in_shapes = [tuple(p.shape) for p in self.params]
        check_loss_tensors(self.loss_func, self.dtype, self.device)
        self.data = self._check_data(data)
        counted, self.local_normaliser, terms = self._scan_data(count=num_data is None)
        self.local_num_data = counted if num_data is None else int(num_data)
        return {
            "num_data": self.local_num_data,
            "normaliser": self.local_normaliser,
            "terms_per_datum": terms,
            "shapes": self.in_shapes,
            "dtype": str(self.dtype),
            "loss": None if self.loss_func is None else type(self.loss_func).__name__,
            "reduction": self._reduction,
        }

    def _check_normaliser(self, summaries: list[dict[str, Any]]) -> None:
        """Refuse data whose ``"mean"`` normaliser is zero or unknowable (on every rank alike).

        Raises:
            ValueError: If every loss term is ignored, or if a loss whose normaliser
                ``curvops`` does not know gets targets with different entries per datum.
        """
        if self.normaliser <= 0 and self.num_data > 0:
            raise ValueError(
                f"{self.loss.name}(reduction='mean') has nothing to average over: every loss "
                "term of the data is ignored (e.g. all targets equal ignore_index)."
            )
        terms = sorted({t for s in summaries for t in s["terms_per_datum"]})
        if len(terms) > 1:
            raise ValueError(
                f"{self.loss.name}(reduction='mean'): curvops does not know this loss's "
                "normaliser and weights batches by their number of data, which is exact only if "
                "every datum has the same number of loss terms; but the targets have "
                f"{terms} entries per datum in different batches. Use reduction='sum' and scale "
                "the operator by 1 / (your number of loss terms), e.g. "
                "`(1 / Z) * HessianLinearOperator(...)`."
            )

    # ---------------------------------------------------------------- binding
    def _bind_params(self, params) -> tuple[list[Tensor], list[str], bool]:
        as_dict = isinstance(params, Mapping)
        if as_dict:
            names, tensors = list(params.keys()), list(params.values())
        elif isinstance(params, (list, tuple)):
            tensors = list(params)
            names = None
        else:
            raise TypeError(
                f"params must be a list of tensors or a dict name -> tensor, got {type(params)}."
                " Tip: pass `list(model.parameters())`."
            )
        if not tensors:
            raise ValueError("params is empty: pass at least one parameter tensor.")
        for i, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] is a {type(p)}, not a torch.Tensor.")
            if not p.requires_grad:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) does not require grad. Pass only "
                    "trainable parameters, or call `p.requires_grad_(True)` on it first."
                )
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError("params contains the same tensor more than once.")
        if len({(p.dtype, p.device) for p in tensors}) != 1:
            raise ValueError(
                "All params must share one dtype and device; got "
                f"{sorted({(str(p.dtype), str(p.device)) for p in tensors})}."
            )
        if self.module is not None:
            by_id = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
            module_names = []
            for i, p in enumerate(tensors):
                if id(p) not in by_id:
                    raise ValueError(
                        f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model "
                        "(not found in model.named_parameters()). Pass the model's own "
                        "parameter tensors, not copies or non-leaf tensors derived from them."
                    )
                module_names.append(by_id[id(p)])
            names = module_names
        elif names is None:
            names = [str(i) for i in range(len(tensors))]
        return tensors, names, as_dict

    def _check_data(self, data: Iterable) -> Iterable:
        check_data_container(data)
        if type(data) in (list, tuple):  # iterable many times, and without random draws
            return data
        try:
            with self.rng_isolation():  # iter() of a shuffling DataLoader draws a seed
                it = iter(data)
        except TypeError as e:
            raise TypeError(f"data must be an iterable of (X, y) batches, got {type(data)}.") from e
        if it is data:
            raise TypeError(
                "data is a one-shot iterator (iter(data) is data); operators traverse the data "
                "many times. Pass a list of (X, y) batches or a torch DataLoader instead."
            )
        return data

    def batch_size(self, X: Any) -> int:
        """Number of data in the input batch ``X``."""
        if self.batch_size_fn is not None:
            with _explained_missing_keys(X, "batch_size_fn"):
                n = self.batch_size_fn(X)
            return check_positive_int(n, "batch_size_fn(X)", minimum=0)
        if isinstance(X, Mapping):
            raise ValueError(
                "X is a mapping (e.g. a HuggingFace BatchEncoding): pass batch_size_fn, e.g. "
                "`batch_size_fn=lambda X: X['input_ids'].shape[0]`."
            )
        if not isinstance(X, Tensor):
            raise TypeError(f"X has type {type(X)}; pass tensors, or a mapping with batch_size_fn.")
        return X.shape[0]

    def _unpack(self, batch: Any) -> tuple[Any, Any]:
        X, y = unpack_batch(batch)
        # NOTE [data dtypes and devices]
        check_batch_dtypes(X, y, self.dtype, with_targets=self.loss is not None)
        return X, y

    def _scan_data(self, *, count: bool) -> tuple[int, float, list[int]]:
        """One pass over the targets: data count, normaliser and entries per datum.

        No forward pass; skipped if neither the count nor the normaliser is needed
        (NOTE [batch weights]).

        Args:
            count: Whether the number of data is needed.

        Returns:
            The number of data (0 if not counted), this shard's normaliser
            :math:`\\sum_\\mathbb{B} Z_\\mathbb{B}` (0 for ``"sum"``) and the distinct
            target entries per datum of a loss with unknown normaliser.
        """
        mean = self._reduction == "mean"
        if not (count or mean):
            return 0, 0.0, []
        num, normaliser, terms = 0, 0.0, set()
        with self.rng_isolation(forward=False):
            for raw in self.data:
                X, y = self._unpack(raw)
                n = self.batch_size(X)
                if n == 0:  # NOTE [empty batches]
                    continue
                num += n
                if mean:
                    normaliser += self.loss.normaliser(y, n)
                    t = self.loss.terms_per_datum(y, n)
                    if t is not None:
                        terms.add(t)
        return num, normaliser, sorted(terms)

    # ---------------------------------------------------------------- the data loop
    def rng_isolation(
        self, *, forward: bool = True, seeds: bool = False
    ) -> contextlib.AbstractContextManager:
        """Context that restores the global RNG state(s) on exit (dropout, shuffling).

        NOTE [RNG isolation of plain data]: iterating over a list or tuple of batches draws
        no random numbers (a shuffling ``DataLoader``'s ``iter()`` does), and neither does a
        forward pass of a row-wise model (:func:`curvops.risk.module_state.row_wise`:
        no dropout in training mode, no custom code). Then there is nothing to restore and
        saving and restoring the generator's state is skipped (it costs as much as a small
        layer's forward pass).

        Args:
            forward: The context also covers forward passes of the model.
            seeds: The context seeds the global generator itself (always isolated).
        """
        plain = type(getattr(self, "data", None)) in (list, tuple)
        if plain and not seeds and (not forward or self._row_wise):
            return contextlib.nullcontext()
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    @property
    def _row_wise(self) -> bool:
        return row_wise(self.module)

    def batches(self, desc: str = "") -> Iterator[Batch]:
        """Iterate over the data (the one data loop of ``curvops``).

        NOTE [empty batches]: a batch without data (``batch_size(X) == 0``, e.g. the last
        batch of a filtered loader) is skipped: it has no loss terms, so it contributes
        nothing to any matrix, while evaluating it would give a ``nan`` mean loss. So is a
        batch whose targets have no entries (sequences of length 0): it has no loss terms
        either, and some double-backward kernels (the embedding's) fail on empty tensors.

        The pass holds the process-wide lock of NOTE [threads] and restores the model's
        buffers after every batch (NOTE [module buffers]).

        Args:
            desc: Description shown in the progress bar.

        Yields:
            :class:`Batch` objects with data on the device and their batch weights.

        Raises:
            ValueError: If a pass yields a different number of data than counted.
        """
        refuse_inference_mode(self.owner)  # NOTE [inference mode]
        total = len(self.data) if hasattr(self.data, "__len__") else None
        mean = self._reduction == "mean"
        seen, seen_normaliser = 0, 0.0
        with DATA_PASS_LOCK, self.rng_isolation(), BufferGuard(self.module) as buffers:
            loop = self.data  # (a disabled tqdm still costs tens of microseconds per pass)
            if self.progressbar:
                loop = tqdm(self.data, desc=desc, total=total, leave=False)
            for raw in loop:
                X, y = self._unpack(raw)
                n = self.batch_size(X)
                if n == 0:  # NOTE [empty batches]
                    continue
                seen += n
                if isinstance(y, Tensor) and y.numel() == 0:  # NOTE [empty batches]
                    continue  # e.g. sequences of length 0: no loss terms
                weight = 1.0
                if mean:  # NOTE [batch weights]
                    z = self.loss.normaliser(y, n)
                    seen_normaliser += z
                    if z == 0:  # every loss term ignored: contributes nothing
                        continue
                    weight = z / self.normaliser
                yield Batch(_to_device(X, self.device), _to_device(y, self.device), n, weight)
                buffers.restore()
        if seen != self.local_num_data:
            raise ValueError(
                f"A pass over the data yielded {seen} data, but num_data says "
                f"{self.local_num_data}. Pass num_data matching the data (or leave it None), "
                "and avoid loaders with drop_last=True and random sampling."
            )
        if mean and abs(seen_normaliser - self.local_normaliser) > 1e-9 * self.local_normaliser:
            raise ValueError(
                f"A pass over the data gave the loss normaliser {seen_normaliser:g} (e.g. the "
                f"number of non-ignored targets), but the first pass counted "
                f"{self.local_normaliser:g}: the data changed between passes. Pass the same data "
                "every time (no random sampling or augmentation of the targets)."
            )

    @property
    def _reduction(self) -> str:
        return "sum" if self.loss is None else self.loss.reduction

    def forward(self, param_values: list[Tensor] | tuple[Tensor, ...], X: Any) -> Tensor:
        """Evaluate the model with the given parameter values (functionally).

        Args:
            param_values: Values for :attr:`params`, in the same order.
            X: The input batch.

        Returns:
            The model output.
        """
        with _explained_missing_keys(X, "The model"):
            if self.module is not None:
                values = self._fixed_tensors()  # NOTE [fixed parameters]
                values.update(zip(self.param_names, param_values))
                return functional_call(self.module, values, (X,))
            if self._params_as_dict:
                return self.model_func(dict(zip(self.param_names, param_values)), X)
            return self.model_func(list(param_values), X)

    def _fixed_tensors(self) -> dict[str, Tensor]:
        """Detached stand-ins for the module's trainable tensors outside :attr:`params`.

        NOTE [fixed parameters]: the operators differentiate with respect to :attr:`params`
        only; every other parameter (and buffer) of the module is a constant of the risk.
        But a module's own parameters require grad, and PyTorch records an autograd graph
        through every operation that reads them, also inside ``torch.func`` transforms. With
        a parameter subset (last-layer Laplace: ``params`` = the head's weight and bias while
        the body still requires grad) the products, dense matrices, gradients and estimates
        would carry a ``grad_fn`` into the body's parameters, keep its activations alive,
        and make a client's later ``backward`` fail with "Trying to backward through the
        graph a second time". So every forward pass substitutes a ``detach()``-ed alias of
        each such tensor (same storage, no copy, the caller's tensors and their
        ``requires_grad`` untouched). A tensor tied to one of :attr:`params` (registered
        under several names) is left to :func:`torch.func.functional_call`'s weight tying;
        the aliases of a tensor tied to itself under several names are one object, as
        ``functional_call`` requires. For a callable ``model_func`` that closes over
        trainable tensors ``curvops`` cannot substitute them; the results are still detached
        (:meth:`loss_and_gradient`, the operators' products), at the cost of the recorded
        graph.

        Returns:
            Name -> detached tensor for the module's trainable parameters and buffers that
            are not in :attr:`params` (all names of a tied tensor).
        """
        fixed: dict[str, Tensor] = {}
        aliases: dict[int, Tensor] = {}
        if self._tensor_slots is None:  # where the module keeps tensors, found once (a
            # traversal of every module per forward pass cost 1.5 ms on a 120-module net)
            self._tensor_slots = [
                (f"{prefix}.{attr}" if prefix else attr, store, attr)
                for prefix, sub in self.module.named_modules(remove_duplicate=False)
                for store in (sub._parameters, sub._buffers)
                for attr in store
            ]
        for name, store, attr in self._tensor_slots:
            t = store.get(attr)  # the current tensor (a reassigned attribute is followed)
            if t is None or not t.requires_grad or id(t) in self._param_ids:
                continue
            if id(t) not in aliases:
                aliases[id(t)] = t.detach()
            fixed[name] = aliases[id(t)]
        return fixed

    def batch_loss(self, param_values: list[Tensor] | tuple[Tensor, ...], batch: Batch) -> Tensor:
        """The batch loss :math:`\\mathcal{L}_\\mathbb{B}` at ``param_values``."""
        return self.loss(self.forward(param_values, batch.X), batch.y)

    def all_reduce_(self, tensors: list[Tensor], **kwargs: Any) -> list[Tensor]:
        """Sum tensors across the processes of the group in place (no-op when not distributed).

        Prefer :meth:`partial_sums`, which also makes every rank raise if one rank fails
        while accumulating.

        Args:
            tensors: Tensors holding this process's partial sums.
            **kwargs: ``inputs`` and ``what`` of
                :meth:`curvops.risk.distributed.ProcessGroupHandle.all_reduce_`.

        Returns:
            The same tensors, now holding the sums over all processes.
        """
        return self.group.all_reduce_(tensors, **kwargs)

    def partial_sums(
        self,
        tensors: list[Tensor],
        *,
        inputs: list[Tensor] | None = None,
        what: str = "A reduction across processes",
    ) -> contextlib.AbstractContextManager[list[Tensor]]:
        """Context whose body accumulates partial sums over this process's data.

        On exit the tensors are summed across processes; an exception on any rank is raised
        on every rank (NOTE [data parallelism] in :mod:`curvops.risk.distributed`). Without
        distribution this is a plain block.

        Args:
            tensors: Zero-initialised accumulators, same shapes on every rank.
            inputs: Tensors every rank must hold identically (the vectors being multiplied).
            what: What is being summed, for error messages.

        Returns:
            The context manager; it yields ``tensors``.
        """
        return self.group.partial_sums(tensors, inputs=inputs, what=what)

    def loss_and_gradient(self) -> tuple[Tensor, list[Tensor]]:
        r"""The empirical risk :math:`\mathcal{L}_\mathbb{D}` and its gradient.

        Returns:
            The risk (a scalar tensor) and its gradient as a tensor list shaped like the
            parameters. Does not touch ``.grad``.

        Raises:
            FloatingPointError: If the risk or the gradient contains NaN or Inf (NOTE
                [non-finite values]).
        """
        if self.loss is None:
            raise ValueError("This operator has no loss function.")
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grads = [torch.zeros_like(p) for p in self.params]
        batches = contextlib.closing(self.batches(desc="gradient"))  # ends on errors too
        with self.partial_sums([total, *grads], what="The loss and gradient"), batches as loop:
            for batch in loop:
                g, loss = self._grad_and_value(batch)
                total += batch.weight * loss.detach()
                for acc, gi in zip(grads, g):
                    acc.add_(gi, alpha=batch.weight)
        require_finite([total], owner=self.owner, what="the loss")  # NOTE [non-finite values]
        require_finite(grads, owner=self.owner, what="the gradient")
        # a callable model_func may close over trainable tensors (NOTE [fixed parameters])
        return total.detach(), [g.detach() for g in grads]

    def _grad_and_value(self, batch: Batch) -> tuple[tuple[Tensor, ...], Tensor]:
        params = [p.detach() for p in self.params]
        with explained_buffer_updates(self.owner):
            return torch.func.grad_and_value(
                lambda *p: self.batch_loss(p, batch), argnums=tuple(range(len(params)))
            )(*params)
