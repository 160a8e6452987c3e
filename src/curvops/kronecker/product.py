r"""The products of the Kronecker family: a few matrix products per layer, planned once.

KFAC, EKFAC and their inverses are block-diagonal; every block acts on one layer's weight
(viewed as the matrix :math:`X \in \mathbb{R}^{m \times n}`, NOTE [Kronecker order] of
:mod:`curvops.structured.kronecker`), on its weight and bias stacked as :math:`[X \mid b]`, on
a bias alone (:math:`n = 1`), or is a diagonal (fallback parameters). The blocks are built
once, when the factors are known, as plain tensors; a product then runs, per block and for
all :math:`K` columns at once, only

* :class:`KroneckerCore`: :math:`(L \otimes R)\operatorname{vec}_r X = L X R^\top`, two
  matrix products (a diagonal :math:`L`, the token counts of an embedding, scales rows);
* :class:`EigenCore`: :math:`(Q_L \otimes Q_R) \operatorname{diag}(\operatorname{vec}_r
  \Lambda) (Q_L \otimes Q_R)^\top`, i.e. :math:`Q_L ((Q_L^\top X Q_R) \odot \Lambda)
  Q_R^\top`, four matrix products (EKFAC and exactly damped inverses);
* :class:`DiagonalBlock`: an elementwise product.

No operator objects are created and no shapes are validated per product; the only copies are
the reshapes of :math:`K > 1` columns between the two sides of a Kronecker product and the
stacking of a joint weight and bias. Tensor-list entries are read as views of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator


def _apply_sides(left: Tensor | None, right_t: Tensor | None, x: Tensor) -> Tensor:
    r"""Compute :math:`L X_k M` for every column ``k`` of ``x`` ``[m, n, K]``.

    ``None`` is the identity; a 1-D ``left`` is a diagonal (it scales the rows). ``right_t``
    is the matrix :math:`M` multiplied from the right (:math:`R^\top` of a Kronecker factor
    :math:`R`).
    """
    m, n, K = x.shape
    if left is not None and left.ndim == 1:
        x = left[:, None, None] * x
        left = None
    if K == 1:  # two plain matrix products on the [m, n] slice
        y = x[..., 0]
        if left is not None:
            y = left @ y
        if right_t is not None:
            y = y @ right_t
        return y.unsqueeze(-1)
    if left is not None:
        x = (left @ x.reshape(m, n * K)).reshape(left.shape[0], n, K)
    if right_t is not None:
        rows = x.shape[0]
        x = right_t.T @ x.transpose(0, 1).reshape(n, rows * K)  # one copy of the columns
        x = x.reshape(right_t.shape[1], rows, K).transpose(0, 1)
    return x


def _side_diagonal(side: Tensor | None, size: int, like: Tensor) -> Tensor:
    """The diagonal of one side of a Kronecker product (a 1-D side is a diagonal)."""
    if side is None:
        return torch.ones(size, dtype=like.dtype, device=like.device)
    return side if side.ndim == 1 else side.diagonal()


@dataclass(frozen=True)
class KroneckerCore:
    r""":math:`X \mapsto L X R^\top` on ``[m, n, K]`` (a Kronecker product :math:`L \otimes R`).

    Attributes:
        left: :math:`L` ``[m, m]``, a diagonal ``[m]``, or ``None`` (identity).
        right: :math:`R` ``[n, n]`` or ``None`` (identity).
        symmetric: Whether :math:`R` is symmetric; then it multiplies as stored, not as a
            transposed view (faster for wide layers).
    """

    left: Tensor | None
    right: Tensor | None
    symmetric: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        """Apply to ``x`` ``[m, n, K]``."""
        right_t = self.right if self.symmetric or self.right is None else self.right.T
        return _apply_sides(self.left, right_t, x)

    def diagonal(self, m: int, n: int, like: Tensor) -> Tensor:
        r"""The diagonal ``[m, n]`` (``like``: a tensor of the dtype and device).

        :math:`\operatorname{diag}(L \otimes R) = \operatorname{diag}(L) \otimes
        \operatorname{diag}(R)`.
        """
        left = _side_diagonal(self.left, m, like)
        return left.unsqueeze(1) * _side_diagonal(self.right, n, like)


@dataclass(frozen=True)
class EigenCore:
    r""":math:`X \mapsto Q_L ((Q_L^\top X Q_R) \odot \Lambda) Q_R^\top` on ``[m, n, K]``.

    Attributes:
        left: Orthogonal :math:`Q_L` ``[m, m]`` or ``None`` (identity).
        right: Orthogonal :math:`Q_R` ``[n, n]`` or ``None`` (identity).
        eigenvalues: :math:`\Lambda` ``[m, n]``.
    """

    left: Tensor | None
    right: Tensor | None
    eigenvalues: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        """Apply to ``x`` ``[m, n, K]``."""
        left_t = None if self.left is None else self.left.T
        right_t = None if self.right is None else self.right.T
        rotated = _apply_sides(left_t, self.right, x) * self.eigenvalues.unsqueeze(-1)
        return _apply_sides(self.left, right_t, rotated)

    def diagonal(self, m: int, n: int, like: Tensor) -> Tensor:
        r"""The diagonal ``[m, n]``: :math:`(Q_L \odot Q_L) \Lambda (Q_R \odot Q_R)^\top`.

        Entry :math:`(i, j)` of the diagonal is :math:`\sum_{a,b} (Q_L)_{ia}^2 \Lambda_{ab}
        (Q_R)_{jb}^2`.
        """
        d = self.eigenvalues
        if self.left is not None:
            d = self.left.square() @ d
        if self.right is not None:
            d = d @ self.right.square().T
        return d.expand(m, n) if d.shape != (m, n) else d


@dataclass(frozen=True)
class MatrixBlock:
    """A block acting on one layer's weight, weight and bias (joint), or bias.

    Attributes:
        positions: Positions of its tensor-list entries: ``(weight,)``, ``(weight, bias)``
            for a joint block (the bias is appended to the weight matrix as a last column),
            or ``(bias,)``.
        shapes: The shapes of those entries.
        core: Maps ``[m, n, K]`` (``n = 1`` for a bias, ``n + 1`` for a joint block) to the
            same shape.
    """

    positions: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    core: KroneckerCore | EigenCore

    def matmat(self, xs: list[Tensor]) -> list[Tensor]:
        """Multiply onto the block's entries (each with a trailing column axis)."""
        K = xs[0].shape[-1]
        shape = self.shapes[0]
        m = shape[0] if shape else 1
        x = xs[0].reshape(m, -1, K)
        if len(xs) == 1:
            return [self.core(x).reshape(*shape, K)]
        n = x.shape[1]
        y = self.core(torch.cat([x, xs[1].unsqueeze(1)], dim=1))
        return [y[:, :n].reshape(*shape, K), y[:, n]]

    def diagonal_entries(self, like: Tensor) -> list[Tensor]:
        """The diagonal of the block, one tensor per entry (shaped like the entry)."""
        shape = self.shapes[0]
        m = shape[0] if shape else 1
        n = (prod(shape) // m) if m else 0
        d = self.core.diagonal(m, n + len(self.shapes) - 1, like)
        if len(self.shapes) == 1:
            return [d.reshape(shape)]
        return [d[:, :n].reshape(shape), d[:, n].reshape(self.shapes[1])]


@dataclass(frozen=True)
class DiagonalBlock:
    """A diagonal block on one entry (a fallback parameter or its inverse).

    Attributes:
        positions: ``(position,)``.
        diagonal: The diagonal, shaped like the entry.
    """

    positions: tuple[int, ...]
    diagonal: Tensor

    def matmat(self, xs: list[Tensor]) -> list[Tensor]:
        """Multiply onto the entry (with a trailing column axis)."""
        return [self.diagonal.unsqueeze(-1) * xs[0]]

    def diagonal_entries(self, like: Tensor) -> list[Tensor]:
        """The diagonal of the block, as one entry (``like`` is unused)."""
        return [self.diagonal]


class FactoredBlocks(LinearOperator):
    """A symmetric block-diagonal operator of :class:`MatrixBlock` and :class:`DiagonalBlock`.

    Args:
        blocks: The blocks; their positions partition the entries of ``shapes``.
        shapes: Shapes of the tensor list the operator acts on.
        dtype: Data type.
        device: Device.
        psd: Whether the operator is positive semi-definite.
    """

    is_self_adjoint = True

    def __init__(
        self,
        blocks: list[MatrixBlock | DiagonalBlock],
        shapes: list[tuple[int, ...]],
        *,
        dtype: torch.dtype,
        device: torch.device,
        psd: bool,
    ):
        super().__init__(shapes, shapes, dtype=dtype, device=device)
        covered = sorted(p for block in blocks for p in block.positions)
        if covered != list(range(len(shapes))):
            raise ValueError(f"The blocks cover the entries {covered} of {len(shapes)} entries.")
        self._blocks = list(blocks)
        self.is_psd = psd

    @property
    def blocks(self) -> list[MatrixBlock | DiagonalBlock]:
        """The blocks."""
        return list(self._blocks)

    def diagonal(self) -> Tensor:
        """The exact diagonal, flat ``[D]``, from every block's closed form."""
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        entries: list = [None] * len(self.in_shapes)
        for block in self._blocks:
            for p, d in zip(block.positions, block.diagonal_entries(like)):
                entries[p] = d.reshape(-1)
        return torch.cat(entries)

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        out: list = [None] * len(X)
        for block in self._blocks:
            results = block.matmat([X[p] for p in block.positions])
            for p, y in zip(block.positions, results):
                out[p] = y
        return out
