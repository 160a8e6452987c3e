"""Base class of the data-dependent curvature operators (Hessian, GGN, Fishers, Jacobians)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from curvops._compilation import check_compile_options, eager_region
from curvops._integer_options import check_positive_int
from curvops.curvature.dense import batch_gram
from curvops.curvature.diagonal_linear import linear_layers
from curvops.curvature.diagonals import batch_diagonal
from curvops.curvature.products import COLUMN_MEMORY_BUDGET, ProductPlan, plain_tangent
from curvops.linear_operator import FlatBackedList, LinearOperator
from curvops.risk import Batch, EmpiricalRisk
from curvops.risk.concurrency import DATA_PASS_LOCK
from curvops.risk.determinism import (
    NonDeterministicError,
    check_deterministic,
    loss_and_gradient_probe,
)
from curvops.risk.finite import require_finite, require_finite_input
from curvops.risk.module_state import explained_buffer_updates, row_wise


def _row_views(rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Consecutive column blocks of ``rows`` ``[K, D]`` as views ``[K, *shape]``.

    ``narrow`` rather than ``split``: views of a multi-output view function may not be
    updated in place.
    """
    views, offset = [], 0
    for shape in shapes:
        size = prod(shape)
        views.append(rows.narrow(1, offset, size).view(rows.shape[0], *shape))
        offset += size
    return views


def _columns_first(X: list[Tensor]) -> list[Tensor]:
    """Tensor list ``[*shape, K]`` -> ``[K, *shape]`` entries with contiguous columns.

    The products slice columns off the leading axis. A single column gets its own storage,
    so that it becomes a forward-mode tangent without a copy (``make_dual`` copies tangents
    whose storage is larger than the parameter's, into a zero-filled tensor). Columns of a
    flat ``[D, K]`` input are transposed at once (NOTE [flat-backed lists]); one 2-d
    transpose is far faster than one per parameter.
    """
    K = X[0].shape[-1]
    if K == 1:
        return [plain_tangent(x.reshape(1, *x.shape[:-1])) for x in X]
    if isinstance(X, FlatBackedList):
        rows = X.flat.T.contiguous()
        return _row_views(rows, [x.shape[:-1] for x in X])
    return [x.reshape(-1, K).T.contiguous().view(K, *x.shape[:-1]) for x in X]


@contextmanager
def _explained_randomness(owner: str) -> Iterator[None]:
    """Explain ``torch.func``'s error for random operations (dropout) in the forward pass."""
    try:
        yield
    except RuntimeError as e:
        if "randomness" not in str(e):
            raise
        raise NonDeterministicError(
            f"{owner}: the model draws random numbers in its forward pass (e.g. dropout in "
            "train mode), so it does not define a fixed matrix. Call model.eval() or remove the "
            "randomness."
        ) from e


class CurvatureLinearOperator(LinearOperator):
    """A linear operator defined by a sum of per-batch products over the data.

    Subclasses implement :meth:`_batch_matmat`, the product of one batch's (batch-loss
    scaled) matrix with ``V`` given with a *leading* column axis; the base class owns the
    data loop, the batch weights, the reduction across processes, input/output checks and the
    determinism check.

    Products read the parameters' *current* values: after an in-place change (an optimiser
    step, ``load_state_dict``) the operator represents the matrix at the new parameters, with
    nothing to recompute (unlike KFAC's factors). Products never change the caller's state
    (``.grad``, the global RNG, ``requires_grad``, ``model.training``, module buffers: NOTE
    [module buffers] of :mod:`curvops.risk.module_state`); BatchNorm in training mode is
    refused. A product whose result contains NaN or Inf raises ``FloatingPointError`` (NOTE
    [non-finite values] of :mod:`curvops.risk.finite`). Products may be called from several
    threads; the passes over the data run one at a time (NOTE [threads] of
    :mod:`curvops.risk.concurrency`).

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        loss_func: The loss module (``reduction`` ``"mean"`` or ``"sum"``), or ``None`` for
            operators without a loss.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches.
        progressbar: Show a progress bar over batches during products.
        check_deterministic: Evaluate loss, gradient and a product twice at construction and
            raise :class:`NonDeterministicError` if they differ.
        num_data: Total number of data (counted if ``None``).
        batch_size_fn: Maps ``X`` to its batch size (required for mapping inputs).
        process_group: See :class:`curvops.risk.EmpiricalRisk`.
        max_columns_per_pass: Most columns of a multi-column product (``A @ V``,
            :meth:`to_dense`) pushed through one linearisation of the model at once; ``None``
            (default): as many as ``column_memory_budget`` allows.
        column_memory_budget: Bytes the columns of one such pass may hold (estimated from the
            parameter count and the forward pass's intermediate results; NOTE [columns per
            pass] of :mod:`curvops.curvature.products`). Default 128 MiB.
        compile: Compile the per-batch product with ``torch.compile`` once and reuse it for
            every batch and product (NOTE [compiling products] of
            :mod:`curvops._compilation`; ``docs/compile.md``). Not every operator has a
            compiled product (``NotImplementedError`` if not).
        compile_options: Keyword arguments for ``torch.compile`` (default
            ``{"dynamic": False}``), only with ``compile=True``.
    """

    is_self_adjoint = True
    _check_finite = True

    def __init__(
        self,
        model_func: nn.Module | Callable,
        loss_func: nn.Module | None,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable,
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        process_group: Any = None,
        out_shapes: list[tuple[int, ...]] | None = None,
        max_columns_per_pass: int | None = None,
        column_memory_budget: int = COLUMN_MEMORY_BUDGET,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ):
        # strategies learnt at the first products (NOTE [product passes]) and the limits of
        # multi-column products (NOTE [columns per pass])
        if max_columns_per_pass is not None:
            max_columns_per_pass = check_positive_int(max_columns_per_pass, "max_columns_per_pass")
        self._product_plan = ProductPlan(
            max_columns_per_pass=max_columns_per_pass,
            column_memory_budget=check_positive_int(column_memory_budget, "column_memory_budget"),
        )
        self._compiled = None  # NOTE [compiling products]: built at the first product
        self._compile_options = check_compile_options(compile, compile_options, type(self).__name__)
        if compile and not self._has_compiled_product():
            raise NotImplementedError(
                f"{type(self).__name__} has no compiled per-batch product; construct it "
                "without compile=True (torch.compile(lambda v: A @ v) still works)."
            )
        self._risk = EmpiricalRisk(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
            owner=type(self).__name__,
        )
        in_shapes = self._risk.in_shapes
        super().__init__(
            in_shapes,
            in_shapes if out_shapes is None else out_shapes,
            dtype=self._risk.dtype,
            device=self._risk.device,
        )
        if check_deterministic:
            self._check_deterministic()

    # ---------------------------------------------------------------- public helpers
    @property
    def num_data(self) -> int:
        """Total number of data the operator is defined over."""
        return self._risk.num_data

    @property
    def params(self) -> list[Tensor]:
        """The parameters, in the operator's order."""
        return list(self._risk.params)

    def gradient_and_loss(self) -> tuple[list[Tensor], Tensor]:
        """Gradient and value of the empirical risk over the operator's data.

        Returns:
            The gradient as a tensor list shaped like the parameters, and the risk. Uses the
            same scaling as the operator; does not touch ``.grad``.
        """
        loss, grads = self._risk.loss_and_gradient()
        return grads, loss

    # ---------------------------------------------------------------- the product
    def _batch_matmat(
        self,
        params: list[Tensor],
        batch: Batch,
        V: list[Tensor],
        out: list[Tensor],
        alpha: float,
    ) -> None:
        """Add ``alpha`` times one batch's matrix (from the batch loss) times ``V`` to ``out``.

        Args:
            params: Detached parameter values to evaluate at.
            batch: The batch.
            V: Tensor list ``[K, *param_shape]`` (with ``K = 1``, each entry owns its storage).
            out: Accumulators ``[K, *out_shape]``, updated in place.
            alpha: The batch weight :math:`w_\\mathbb{B}`.
        """
        raise NotImplementedError

    # NOTE [compiling products]: subclasses with a compiled per-batch product override both
    def _compiled_product(self) -> Callable[..., tuple[Tensor, ...]]:
        """The pure per-batch product ``(params, *inputs, V) -> [K, *shape]`` to compile."""
        raise NotImplementedError

    def _compiled_inputs(self, params: list[Tensor], batch: Batch) -> tuple:
        """The batch's tensor inputs of :meth:`_compiled_product` (computed eagerly)."""
        raise NotImplementedError

    def _has_compiled_product(self) -> bool:
        return type(self)._compiled_product is not CurvatureLinearOperator._compiled_product

    def _compiled_batch_matmat(
        self, params: list[Tensor], batch: Batch, V: list[Tensor], out: list[Tensor], alpha: float
    ) -> None:
        """:meth:`_batch_matmat` by the compiled product (compiled at the first call)."""
        from curvops.curvature.compiled import CompiledBatchProduct

        if self._compiled is None:
            self._compiled = CompiledBatchProduct(self._compiled_product(), self._compile_options)
        self._compiled(params, self._compiled_inputs(params, batch), V, out, alpha)

    def _before_pass(self) -> None:
        """Hook run before each pass over the data (e.g. to reset a random generator)."""

    @eager_region  # NOTE [compiling products]
    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        K = X[0].shape[-1]
        V = _columns_first(X)
        # NOTE [flat-backed lists]: the products accumulate into the rows of one [K, D]
        # buffer; its transpose is the flat [D, K] result, handed out without a copy
        sizes = [prod(s) for s in self.out_shapes]
        buffer = torch.zeros(K, sum(sizes), dtype=self.dtype, device=self.device)
        out = _row_views(buffer, self.out_shapes)
        # local pass, then the sum across processes (NOTE [data parallelism]); the ranks
        # compare fingerprints of X, and an error on any rank is raised on all of them
        with self._risk.partial_sums([buffer], inputs=X, what=f"{type(self).__name__} product"):
            if self._check_finite:
                require_finite_input(V, owner=type(self).__name__)
            self._accumulate(out, V)
        if self._check_finite:  # NOTE [non-finite values]
            require_finite([buffer], owner=type(self).__name__, what="the product")
        if buffer.requires_grad:  # a callable closing over trainable tensors (NOTE [fixed
            buffer = buffer.detach()  # parameters] of curvops.risk.empirical_risk)
            out = _row_views(buffer, self.out_shapes)
        return FlatBackedList([o.movedim(0, -1) for o in out], buffer.T, fresh=True)

    def _accumulate(self, out: list[Tensor], V: list[Tensor]) -> None:
        """Add this process's weighted per-batch products with ``V`` (``[K, ...]``) to ``out``."""
        params = [p.detach() for p in self._risk.params]
        name = type(self).__name__
        batch_matmat = self._batch_matmat
        if self._compile_options is not None:  # NOTE [compiling products]
            batch_matmat = self._compiled_batch_matmat
        # NOTE [threads]: the lock also covers the operator's per-pass state (its generator);
        # the pass is closed on errors too, so it restores the buffers (NOTE [module buffers])
        with DATA_PASS_LOCK, explained_buffer_updates(name), _explained_randomness(name):
            self._before_pass()
            with closing(self._risk.batches(desc=name)) as batches:
                for batch in batches:
                    batch_matmat(params, batch, V, out, batch.weight)

    # ---------------------------------------------------------------- dense matrix
    def _factors_of_batch(
        self, batch: Batch
    ) -> Callable[[Tensor], tuple[Tensor, Tensor | None]] | None:
        """The output-space factor columns of a batch (NOTE [exact diagonals]), or ``None``.

        Operators that are sums of per-row outer products (GGN, Fishers) return the function
        of the batch output that :meth:`diagonal` and :meth:`to_dense` share.
        """
        return None

    def to_dense(self) -> Tensor:
        r"""The dense ``[D, D]`` matrix (flattening convention of the parameters).

        Per batch, the fastest exact path: the Gram matrix of per-datum gradients where the
        factor columns per datum are few (GGN, empirical and MC Fisher; NOTE [dense Gram
        matrices] of :mod:`curvops.curvature.dense`), otherwise the product with the
        identity, whose columns go through one linearisation of the model in chunks as large
        as ``column_memory_budget`` allows (NOTE [columns per pass]). Same batching, batch
        weights, Monte-Carlo draws (one per batch, as in a product) and sum across processes
        as the products.

        Returns:
            The dense matrix ``[D, D]``.
        """
        if not self.is_self_adjoint or self.shape[0] != self.shape[1]:
            return super().to_dense()
        name = type(self).__name__
        D = self.shape[1]
        buffer = torch.zeros(D, D, dtype=self.dtype, device=self.device)
        eye = torch.eye(D, dtype=self.dtype, device=self.device)
        V = _row_views(eye, self.in_shapes)  # the identity's columns, [D, *shape]
        rows = _row_views(buffer, self.out_shapes)  # symmetric: row k of A is A e_k
        risk = self._risk
        params = [p.detach() for p in risk.params]
        budget = self._product_plan.column_memory_budget
        with risk.partial_sums([buffer], what=f"{name}.to_dense()"):
            # as in _accumulate (NOTE [threads], NOTE [module buffers])
            with DATA_PASS_LOCK, explained_buffer_updates(name), _explained_randomness(name):
                self._before_pass()
                with closing(risk.batches(desc=f"{name} to_dense")) as batches:
                    for batch in batches:
                        factors = self._factors_of_batch(batch)
                        # a declined Gram pass may have drawn the MC Fisher's labels: the
                        # product then draws the same ones again (NOTE [MC seeding])
                        gen = getattr(self, "_generator", None)
                        state = None if gen is None else gen.get_state()
                        done = factors is not None and batch_gram(
                            risk.forward,
                            params,
                            batch.X,
                            batch.batch_size,
                            factors,
                            buffer,
                            alpha=batch.weight,
                            memory_budget=budget,
                        )
                        if not done:
                            if state is not None:
                                gen.set_state(state)
                            self._batch_matmat(params, batch, V, rows, batch.weight)
        if self._check_finite:  # NOTE [non-finite values]
            require_finite([buffer], owner=name, what="the dense matrix")
        return buffer

    # ---------------------------------------------------------------- exact diagonals
    def _diagonal_pass(
        self,
        factors_of_batch: Callable[[Batch], Callable[[Tensor], tuple[Tensor, Tensor | None]]],
        memory_budget: int,
    ) -> Tensor:
        """The flat ``[D]`` sum of weighted per-batch diagonals (NOTE [exact diagonals]).

        Same data loop, batch weights, ``_before_pass`` hook (MC seeding) and sum across
        processes as the products (:meth:`_matmat`).

        Args:
            factors_of_batch: Maps a batch to the function from its model output to the
                output-space factor columns and coefficients (see
                :func:`curvops.curvature.diagonals.batch_diagonal`).
            memory_budget: Bytes of per-datum gradients formed at once.

        Returns:
            The diagonal, flat ``[D]``.
        """
        name = type(self).__name__
        buffer = torch.zeros(self.shape[1], dtype=self.dtype, device=self.device)
        out = [v[0] for v in _row_views(buffer.unsqueeze(0), self.in_shapes)]
        risk = self._risk
        params = [p.detach() for p in risk.params]
        linear = None
        if risk.module is not None:  # NOTE [linear closed form]
            linear = linear_layers(risk.module, risk.param_names, risk.params)
        trusted = row_wise(risk.module)  # NOTE [row-wise models]
        with risk.partial_sums([buffer], what=f"{name}.diagonal()"):
            # as in _accumulate: one pass at a time (NOTE [threads]), buffers restored (NOTE
            # [module buffers]), random forward passes explained
            with DATA_PASS_LOCK, explained_buffer_updates(name), _explained_randomness(name):
                self._before_pass()
                with closing(risk.batches(desc=f"{name} diagonal")) as batches:
                    for batch in batches:
                        batch_diagonal(
                            risk.forward,
                            params,
                            batch.X,
                            batch.batch_size,
                            factors_of_batch(batch),
                            linear=linear,
                            out=out,
                            alpha=batch.weight,
                            memory_budget=memory_budget,
                            progressbar=risk.progressbar,
                            row_wise=trusted,
                        )
        if self._check_finite:  # NOTE [non-finite values]
            require_finite([buffer], owner=name, what="the diagonal")
        return buffer.detach()  # NOTE [fixed parameters] of curvops.risk.empirical_risk

    # ---------------------------------------------------------------- safeguards
    def _check_deterministic(self) -> None:
        """Evaluate loss, gradient and a product twice; raise if they differ.

        See :func:`curvops.risk.determinism.check_deterministic`.

        Raises:
            NonDeterministicError: If any of them differ between the two evaluations (on any
                rank).
        """
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(self.shape[1], generator=gen, dtype=self.dtype).to(self.device)

        def probe() -> dict[str, Tensor]:
            return loss_and_gradient_probe(self._risk) | {"product": self @ v}

        check_deterministic(
            self._risk,
            probe,
            owner=type(self).__name__,
            what="loss, gradient and a matrix-vector product",
        )
