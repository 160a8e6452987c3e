"""The operator algebra: a linear operator base class on tensor lists.

A linear operator :math:`A: \\mathbb{R}^{D_\\text{in}} \\to \\mathbb{R}^{D_\\text{out}}` acts on
*tensor lists* whose entries have the shapes ``in_shapes`` (e.g. the shapes of a neural
net's parameters). Subclasses implement a single matrix-matrix hook, :meth:`_matmat`, on
tensor lists with a trailing column axis; the base class derives everything else:

* ``A @ v`` for a flat vector ``[D_in]``, a flat matrix ``[D_in, K]``, a tensor list shaped
  like ``in_shapes`` (a vector) or a tensor list with a trailing column axis ``[*shape, K]``
  (a matrix), returning the same format it was given;
* ``X @ A`` (left multiplication) for ``[D_out]`` and ``[K, D_out]`` tensors;
* the lazy algebra ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A / c``, ``A @ B``,
  ``A.adjoint()`` and the exports ``A.to_dense()`` and ``A.to_scipy()``.

NOTE [flattening convention]: a tensor list ``[t_1, ..., t_L]`` corresponds to the flat
vector ``cat(t_1.flatten(), ..., t_L.flatten())`` (row-major, PyTorch's order). Matrices
carry their column axis last in both formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from numbers import Number

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

Shapes = list[tuple[int, ...]]


class FlatBackedList(list):
    """A tensor list whose entries ``[*shape_i, K]`` are consecutive views of one flat tensor.

    NOTE [flat-backed lists]: for matrices with many rows, a copy costs about as much as a
    product (memory-bound). :meth:`LinearOperator._flat_to_list` returns its views in such a
    list (``fresh=False``: :attr:`flat` is the caller's input, only to be *read*, e.g. to
    transpose all columns at once), and an operator whose product writes into one fresh
    buffer may return its views in such a list with ``fresh=True``, which
    :meth:`LinearOperator._list_to_flat` then returns as is instead of concatenating.

    Args:
        tensors: The views.
        flat: The flat ``[D, K]`` tensor they are views of (in order).
        fresh: Whether ``flat`` is a new buffer that may be handed to the caller.
    """

    def __init__(self, tensors, flat: Tensor, *, fresh: bool):
        super().__init__(tensors)
        self.flat = flat
        self.fresh = fresh


def _as_shapes(shapes: Sequence[Sequence[int] | torch.Size]) -> Shapes:
    return [tuple(int(s) for s in shape) for shape in shapes]


class LinearOperator:
    """Base class of all linear operators in ``curvops``.

    Subclasses call ``super().__init__(in_shapes, out_shapes, dtype=..., device=...)`` and
    implement :meth:`_matmat`. Operators that are not self-adjoint also implement
    :meth:`_adjoint_matmat`.

    Attributes:
        is_self_adjoint: Whether :math:`A = A^\\top`. Self-adjoint operators need no adjoint
            hook; iterative solvers (CG, Lanczos) require this flag.
        is_psd: Whether the operator is known to be positive semi-definite (used by
            solvers to refuse nonsense early).
    """

    is_self_adjoint: bool = False
    is_psd: bool = False

    def __init__(
        self,
        in_shapes: Sequence[Sequence[int]],
        out_shapes: Sequence[Sequence[int]],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        """Store the shapes, data type and device of the operator.

        Args:
            in_shapes: Shapes of the tensor list the operator acts on.
            out_shapes: Shapes of the tensor list the operator returns.
            dtype: Data type of the operator's products.
            device: Device on which products are carried out.
        """
        self._in_shapes = _as_shapes(in_shapes)
        self._out_shapes = _as_shapes(out_shapes)
        self._dtype = dtype
        self._device = torch.device(device)

    # ---------------------------------------------------------------- properties
    @property
    def in_shapes(self) -> Shapes:
        """Shapes of the tensor list the operator acts on."""
        return list(self._in_shapes)

    @property
    def out_shapes(self) -> Shapes:
        """Shapes of the tensor list the operator returns."""
        return list(self._out_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(D_out, D_in)`` of the represented matrix."""
        return (
            sum(prod(s) for s in self._out_shapes),
            sum(prod(s) for s in self._in_shapes),
        )

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the operator."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the operator."""
        return self._device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )

    # ---------------------------------------------------------------- hooks
    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        """Multiply onto a matrix in tensor-list format (the one hook to implement).

        Args:
            X: Tensor list with entries of shape ``[*in_shape, K]``.

        Returns:
            Tensor list with entries of shape ``[*out_shape, K]``.
        """
        raise NotImplementedError

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        """Multiply the adjoint onto a matrix in tensor-list format.

        Args:
            X: Tensor list with entries of shape ``[*out_shape, K]``.

        Returns:
            Tensor list with entries of shape ``[*in_shape, K]``.

        Raises:
            NotImplementedError: If the operator is not self-adjoint and has no adjoint hook.
        """
        if self.is_self_adjoint:
            return self._matmat(X)
        raise NotImplementedError(
            f"{type(self).__name__} implements no adjoint product (_adjoint_matmat)."
        )

    # ---------------------------------------------------------------- input checks
    def _check_tensor(self, x: Tensor, what: str) -> None:
        if x.dtype != self._dtype:
            raise TypeError(
                f"{what} has dtype {x.dtype}, but {type(self).__name__} has dtype "
                f"{self._dtype}. Convert it with `.to({self._dtype})`."
            )
        if x.device != self._device and not (
            x.device.type == self._device.type and self._device.index is None
        ):
            raise ValueError(
                f"{what} lives on device {x.device}, but {type(self).__name__} lives on "
                f"{self._device}. Move it with `.to('{self._device}')`."
            )

    # ---------------------------------------------------------------- format conversion
    def _list_to_matrix(self, X: Sequence[Tensor], shapes: Shapes) -> tuple[list[Tensor], bool]:
        """Interpret a tensor list as a matrix; return it with a flag whether it was a vector."""
        if len(X) != len(shapes):
            raise ValueError(
                f"Expected a tensor list with {len(shapes)} entries (shapes {shapes}), "
                f"got {len(X)} entries."
            )
        for i, x in enumerate(X):
            if not isinstance(x, Tensor):
                raise TypeError(f"Entry {i} of the tensor list is a {type(x)}, not a Tensor.")
            self._check_tensor(x, f"Entry {i} of the tensor list")
        if all(tuple(x.shape) == s for x, s in zip(X, shapes)):
            return [x.unsqueeze(-1) for x in X], True
        if all(x.ndim == len(s) + 1 and tuple(x.shape[:-1]) == s for x, s in zip(X, shapes)):
            ks = {x.shape[-1] for x in X}
            if len(ks) == 1:
                return list(X), False
        got = [tuple(x.shape) for x in X]
        raise ValueError(
            f"Tensor list shapes {got} match neither the operator's shapes {shapes} "
            f"(a vector) nor those shapes with one common trailing column axis (a matrix)."
        )

    @staticmethod
    def _flat_to_list(x: Tensor, shapes: Shapes) -> list[Tensor]:
        """Split a flat ``[D, K]`` matrix into a tensor list with entries ``[*shape, K]``."""
        sizes = [prod(s) for s in shapes]
        views = [chunk.reshape(*s, x.shape[-1]) for chunk, s in zip(x.split(sizes, dim=0), shapes)]
        return FlatBackedList(views, x, fresh=False)

    @staticmethod
    def _list_to_flat(X: Sequence[Tensor]) -> Tensor:
        """Concatenate a tensor list with entries ``[*shape, K]`` into a flat ``[D, K]``.

        A fresh :class:`FlatBackedList` gives its buffer without copying.
        """
        if isinstance(X, FlatBackedList) and X.fresh:
            return X.flat
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in X], dim=0)

    # ---------------------------------------------------------------- products
    def __matmul__(self, X):
        """Multiply the operator onto a vector, matrix or another operator.

        Args:
            X: A flat vector ``[D_in]``, a flat matrix ``[D_in, K]``, a tensor list shaped
                like :attr:`in_shapes` (vector), a tensor list with a trailing column axis
                (matrix), or another :class:`LinearOperator` (lazy composition).

        Returns:
            The product in the same format as ``X``. A flat matrix may come back column-major
            (a transposed view, not contiguous; NOTE [flat-backed lists]): use ``.reshape``
            rather than ``.view`` on it, or ``.contiguous()``.
        """
        if isinstance(X, LinearOperator):
            return _ChainLinearOperator(self, X)
        if isinstance(X, np.ndarray):
            raise TypeError(
                "Got a NumPy array. Use `A.to_scipy() @ x` for NumPy inputs, or convert with "
                "`torch.from_numpy(x)`."
            )
        if isinstance(X, Tensor):
            return self._matmul_flat(X, self._matmat, self._in_shapes, self._out_shapes)
        if isinstance(X, (list, tuple)):
            Xm, was_vector = self._list_to_matrix(X, self._in_shapes)
            out = self._matmat(Xm)
            return [o.squeeze(-1) for o in out] if was_vector else out
        return NotImplemented

    def _matmul_flat(self, x: Tensor, hook, in_shapes: Shapes, out_shapes: Shapes) -> Tensor:
        d_in = sum(prod(s) for s in in_shapes)
        if x.ndim not in (1, 2) or x.shape[0] != d_in:
            raise ValueError(
                f"Expected a flat vector of shape [{d_in}] or a flat matrix of shape "
                f"[{d_in}, K], got a tensor of shape {tuple(x.shape)}. For tensor lists, "
                f"pass a list of tensors shaped like the parameters."
            )
        self._check_tensor(x, "The input")
        is_vec = x.ndim == 1
        xm = x.unsqueeze(-1) if is_vec else x
        out = self._list_to_flat(hook(self._flat_to_list(xm, in_shapes)))
        return out.squeeze(-1) if is_vec else out

    def __rmatmul__(self, X):
        """Left multiplication ``X @ A`` for a flat ``[D_out]`` or ``[K, D_out]`` tensor.

        Args:
            X: Flat vector ``[D_out]`` or matrix ``[K, D_out]``, or a tensor list shaped like
                :attr:`out_shapes` (a vector, returned as a tensor list shaped like
                :attr:`in_shapes`).

        Returns:
            ``X @ A`` of shape ``[D_in]`` or ``[K, D_in]`` (or a tensor list).
        """
        if isinstance(X, (list, tuple)):
            return self.adjoint() @ X
        if isinstance(X, Tensor):
            if X.ndim == 1:
                return self.adjoint() @ X
            if X.ndim == 2:
                return (self.adjoint() @ X.T).T
            raise ValueError(
                f"Left multiplication expects a [D_out] or [K, D_out] tensor, got shape "
                f"{tuple(X.shape)}."
            )
        return NotImplemented

    # ---------------------------------------------------------------- algebra
    def adjoint(self) -> LinearOperator:
        """Return the adjoint (transpose) operator :math:`A^\\top`."""
        if self.is_self_adjoint:
            return self
        return _AdjointLinearOperator(self)

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        """Alias of :meth:`adjoint`."""
        return self.adjoint()

    def __add__(self, other):
        if isinstance(other, LinearOperator):
            return _SumLinearOperator([self, other], [1.0, 1.0])
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            return _SumLinearOperator([self, other], [1.0, -1.0])
        return NotImplemented

    def __neg__(self):
        return _SumLinearOperator([self], [-1.0])

    def __mul__(self, c):
        if isinstance(c, (Number, Tensor)) and not isinstance(c, bool):
            if isinstance(c, Tensor) and c.numel() != 1:
                raise ValueError("Only scalars can multiply a linear operator with `*`.")
            return _SumLinearOperator([self], [float(c)])
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c):
        if isinstance(c, (Number, Tensor)) and not isinstance(c, bool):
            if float(c) == 0.0:
                raise ZeroDivisionError("Cannot divide a linear operator by zero.")
            return self * (1.0 / float(c))
        return NotImplemented

    # ---------------------------------------------------------------- exports
    def to_dense(self) -> Tensor:
        """Materialise the operator as a dense ``[D_out, D_in]`` matrix (for small D).

        Returns:
            The dense matrix, with one matrix-matrix product with the identity.
        """
        eye = torch.eye(self.shape[1], dtype=self._dtype, device=self._device)
        return self @ eye

    def to_scipy(self, dtype: np.dtype | type | None = None) -> scipy.sparse.linalg.LinearOperator:
        """Export as a :class:`scipy.sparse.linalg.LinearOperator` consuming NumPy arrays.

        The products still run in PyTorch on the operator's device; only the inputs and
        results cross to the host.

        Args:
            dtype: NumPy dtype of the exported operator. Defaults to the operator's dtype.

        Returns:
            A SciPy linear operator with ``matvec``, ``rmatvec``, ``matmat`` and ``rmatmat``.
        """
        np_dtype = (
            np.dtype(dtype)
            if dtype is not None
            else torch.empty(0, dtype=self._dtype).numpy().dtype
        )

        def to_torch(x: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(x, dtype=np_dtype), device=self._device).to(
                self._dtype
            )

        def to_numpy(x: Tensor) -> np.ndarray:
            return x.detach().cpu().numpy().astype(np_dtype, copy=False)

        def matvec(x):
            return to_numpy(self @ to_torch(x).reshape(-1))

        def matmat(X):
            return to_numpy(self @ to_torch(X))

        def rmatvec(x):
            return to_numpy(self.adjoint() @ to_torch(x).reshape(-1))

        def rmatmat(X):
            return to_numpy(self.adjoint() @ to_torch(X))

        return scipy.sparse.linalg.LinearOperator(
            shape=self.shape,
            matvec=matvec,
            rmatvec=rmatvec,
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=np_dtype,
        )


# ==================================================================== lazy compositions
class _SumLinearOperator(LinearOperator):
    """Lazy weighted sum :math:`\\sum_i c_i A_i` of operators with matching shapes."""

    def __init__(self, ops: list[LinearOperator], coeffs: list[float]):
        first = ops[0]
        for op in ops[1:]:
            if op.in_shapes != first.in_shapes or op.out_shapes != first.out_shapes:
                raise ValueError(
                    f"Cannot add operators of shapes {first.shape} and {op.shape} (tensor "
                    f"shapes {first.in_shapes} vs. {op.in_shapes})."
                )
            if op.dtype != first.dtype or op.device != first.device:
                raise ValueError(
                    f"Cannot add operators with dtype/device {first.dtype}/{first.device} "
                    f"and {op.dtype}/{op.device}."
                )
        # flatten nested sums
        flat_ops, flat_coeffs = [], []
        for op, c in zip(ops, coeffs):
            if isinstance(op, _SumLinearOperator):
                flat_ops.extend(op._ops)
                flat_coeffs.extend(c * ci for ci in op._coeffs)
            else:
                flat_ops.append(op)
                flat_coeffs.append(c)
        super().__init__(first.in_shapes, first.out_shapes, dtype=first.dtype, device=first.device)
        self._ops, self._coeffs = flat_ops, flat_coeffs
        self.is_self_adjoint = all(op.is_self_adjoint for op in flat_ops)
        self.is_psd = all(op.is_psd for op in flat_ops) and all(c >= 0 for c in flat_coeffs)

    def _combine(self, results: list[list[Tensor]]) -> list[Tensor]:
        out = [self._coeffs[0] * r for r in results[0]]
        for c, res in zip(self._coeffs[1:], results[1:]):
            out = [o + c * r for o, r in zip(out, res)]
        return out

    def _matmat(self, X):
        return self._combine([op._matmat(X) for op in self._ops])

    def _adjoint_matmat(self, X):
        return self._combine([op.adjoint()._matmat(X) for op in self._ops])

    def _terms(self, name: str) -> list[Tensor]:
        """Call ``name`` (``diagonal`` or ``trace``) on every term, flattening tensor lists."""
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"{name}() needs a square operator, got shape {self.shape}.")
        results = []
        for op in self._ops:
            method = getattr(op, name, None)
            if method is None:
                short = "diag" if name == "diagonal" else "trace"
                raise NotImplementedError(
                    f"{type(op).__name__} has no {name}(), so the sum containing it has none "
                    f"either. Estimate it with curvops.hutchinson_{short} or curvops.x{short}."
                )
            r = method()
            results.append(torch.cat([t.reshape(-1) for t in r]) if isinstance(r, list) else r)
        return results

    def diagonal(self) -> Tensor:
        r"""Diagonal ``[D]`` (flat), :math:`\sum_i c_i \operatorname{diag}(A_i)`.

        Raises:
            NotImplementedError: If a term has no ``diagonal()`` (or its own raises).
            ValueError: If the operator is not square.
        """
        return sum(c * d for c, d in zip(self._coeffs, self._terms("diagonal")))

    def trace(self) -> Tensor:
        r"""Trace :math:`\sum_i c_i \operatorname{tr}(A_i)`.

        Raises:
            NotImplementedError: If a term has no ``trace()`` (or its own raises).
            ValueError: If the operator is not square.
        """
        return sum(c * t for c, t in zip(self._coeffs, self._terms("trace")))


class _ChainLinearOperator(LinearOperator):
    """Lazy product :math:`A B` (``B`` is applied first)."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        if A.in_shapes != B.out_shapes:
            raise ValueError(
                f"Cannot chain operators: A has input shapes {A.in_shapes}, B has output "
                f"shapes {B.out_shapes} (shapes {A.shape} @ {B.shape})."
            )
        if A.dtype != B.dtype or A.device != B.device:
            raise ValueError(
                f"Cannot chain operators with dtype/device {A.dtype}/{A.device} and "
                f"{B.dtype}/{B.device}."
            )
        super().__init__(B.in_shapes, A.out_shapes, dtype=A.dtype, device=A.device)
        self._A, self._B = A, B

    def _matmat(self, X):
        return self._A._matmat(self._B._matmat(X))

    def _adjoint_matmat(self, X):
        return self._B.adjoint()._matmat(self._A.adjoint()._matmat(X))


class _AdjointLinearOperator(LinearOperator):
    """Lazy adjoint :math:`A^\\top` of an operator."""

    def __init__(self, A: LinearOperator):
        super().__init__(A.out_shapes, A.in_shapes, dtype=A.dtype, device=A.device)
        self._A = A

    def _matmat(self, X):
        return self._A._adjoint_matmat(X)

    def _adjoint_matmat(self, X):
        return self._A._matmat(X)

    def adjoint(self) -> LinearOperator:
        """Return the original operator."""
        return self._A
