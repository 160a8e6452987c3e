r"""The model's Jacobian on the data, and its transpose, as linear operators.

The Jacobian stacks the per-batch Jacobians :math:`J_\theta f(X_\mathbb{B})` of the model
outputs over all batches (batch order, then datum order); no loss is involved. Its output
space is one tensor of shape ``[N, *output_shape]``. Not data-parallel: each process's output
space is its own shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import closing
from typing import Any

import torch
from torch import Tensor, nn

from curvops.curvature.base import CurvatureLinearOperator
from curvops.curvature.products import jacobian_matmat, jacobian_t_matmat
from curvops.linear_operator import LinearOperator
from curvops.risk.finite import require_finite, require_finite_input
from curvops.risk.module_state import explained_buffer_updates


class JacobianLinearOperator(CurvatureLinearOperator):
    r"""Jacobian :math:`J = \partial [f_\theta(x_1), \dots, f_\theta(x_N)] / \partial \theta`.

    Maps parameter space (tensor lists shaped like ``params``) to output space (one tensor
    ``[N, *output_shape]``). Products use forward mode; left products (``u @ J``, i.e.
    :math:`J^\top u`) use reverse mode. Like every curvature operator, products read the
    current parameters, never change the model's state, and raise ``FloatingPointError`` on
    NaN or Inf results (see :class:`~curvops.curvature.base.CurvatureLinearOperator`).

    Args:
        model_func: An ``nn.Module`` or a callable ``(params, X) -> output``.
        params: List of parameter tensors or dict name -> tensor.
        data: Re-iterable of ``(X, y)`` batches (``y`` is ignored).
        progressbar: Show a progress bar over batches.
        check_deterministic: Check that two products agree at construction.
        num_data: Total number of data (counted if ``None``).
        batch_size_fn: Maps ``X`` to its batch size (required for mapping inputs).
    """

    is_self_adjoint = False

    def __init__(
        self,
        model_func: nn.Module | Callable,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable,
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ):
        from curvops.risk import EmpiricalRisk

        probe = EmpiricalRisk(
            model_func,
            None,
            params,
            data,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=False,
            owner=type(self).__name__,
        )
        # inside the pass (closed after), so that the pass restores buffers the forward changes
        with torch.no_grad(), closing(probe.batches()) as batches:
            first = next(batches)
            out_shape = tuple(probe.forward([p.detach() for p in probe.params], first.X).shape[1:])
        super().__init__(
            model_func,
            None,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=probe.local_num_data,
            batch_size_fn=batch_size_fn,
            process_group=False,
            out_shapes=[(probe.local_num_data, *out_shape)],
        )

    def _f(self, batch):
        return lambda *p: self._risk.forward(p, batch.X)

    def _check_output_shape(self, shape: tuple[int, ...], index: int) -> None:
        expected = tuple(self.out_shapes[0][1:])
        if tuple(shape) != expected:
            raise ValueError(
                f"{type(self).__name__} stacks the outputs of all batches, which must share "
                f"the shape [N_B, *{list(expected)}] of the first batch; batch {index} gives "
                f"[N_B, *{list(shape)}] (e.g. sequences of another length). Pad the data to "
                "one shape, or build one operator per shape."
            )

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        owner = type(self).__name__
        require_finite_input(X, owner=owner)
        V = [x.movedim(-1, 0) for x in X]
        params = [p.detach() for p in self._risk.params]
        blocks = []
        with explained_buffer_updates(owner), closing(self._risk.batches("J @ V")) as batches:
            for i, batch in enumerate(batches):
                blocks.append(jacobian_matmat(self._f(batch), params, V))
                self._check_output_shape(blocks[-1].shape[2:], i)
        result = torch.cat(blocks, dim=1).movedim(0, -1)
        require_finite([result], owner=owner, what="the product")  # NOTE [non-finite values]
        return [result.detach()]  # NOTE [fixed parameters] of curvops.risk.empirical_risk

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        owner = type(self).__name__
        require_finite_input(X, owner=owner)
        U = X[0].movedim(-1, 0)  # [K, N, *out]
        K = U.shape[0]
        params = [p.detach() for p in self._risk.params]
        out = [torch.zeros(K, *s, dtype=self.dtype, device=self.device) for s in self.in_shapes]
        start = 0
        with explained_buffer_updates(owner), closing(self._risk.batches("J^T @ U")) as batches:
            for batch in batches:
                U_b = U[:, start : start + batch.batch_size]
                start += batch.batch_size
                for o, r in zip(out, jacobian_t_matmat(self._f(batch), params, U_b)):
                    o.add_(r)
        require_finite(out, owner=owner, what="the product")  # NOTE [non-finite values]
        # detached: NOTE [fixed parameters] of curvops.risk.empirical_risk
        return [o.detach().movedim(0, -1) for o in out]


class TransposedJacobianLinearOperator(LinearOperator):
    r"""Transposed Jacobian :math:`J^\top`, mapping output space ``[N, *out]`` to parameters.

    Same arguments as :class:`JacobianLinearOperator`; products use reverse mode.
    """

    def __init__(self, model_func, params, data, **kwargs):
        self._J = JacobianLinearOperator(model_func, params, data, **kwargs)
        super().__init__(
            self._J.out_shapes, self._J.in_shapes, dtype=self._J.dtype, device=self._J.device
        )

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._J._adjoint_matmat(X)

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._J._matmat(X)

    def adjoint(self) -> LinearOperator:
        """Return the Jacobian."""
        return self._J
