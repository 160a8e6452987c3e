"""Block-diagonal operators on tensor lists, with blocks on arbitrary (interleaved) entries."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from numbers import Integral

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator
from curvops.structured._checks import as_scalar, check_damping


class BlockDiagonalLinearOperator(LinearOperator):
    """Block-diagonal operator :math:`\\operatorname{blockdiag}(B_1, \\dots, B_n)` on tensor lists.

    Block :math:`b` acts on the entries ``positions[b]`` of the overall tensor list: its
    ``j``-th input entry is entry ``positions[b][j]`` of the input list, and its ``j``-th
    output entry is written to entry ``positions[b][j]`` of the output list. The positions
    must partition ``range(L)``, :math:`L` the total number of entries; they need not be
    consecutive, so blocks may interleave (e.g. a KFAC approximation whose parameters are
    given in a shuffled order). By default blocks occupy consecutive entries.

    Closed forms delegate blockwise: :math:`\\operatorname{tr} = \\sum_b \\operatorname{tr}
    B_b`, :math:`\\log\\det = \\sum_b \\log\\det B_b`, :math:`\\det = \\prod_b \\det B_b`,
    :math:`\\|\\cdot\\|_F^2 = \\sum_b \\|B_b\\|_F^2`, the diagonal is assembled from the blocks'
    diagonals and the inverse is block-diagonal with the blocks' inverses.

    Examples:
        >>> import torch
        >>> from curvops.structured import DiagonalLinearOperator, IdentityLinearOperator
        >>> I2 = IdentityLinearOperator([(2,)], dtype=torch.float64, device="cpu", scale=2.0)
        >>> D = DiagonalLinearOperator([torch.ones(3, dtype=torch.float64)])
        >>> A = BlockDiagonalLinearOperator([I2, D])
        >>> A.in_shapes, float(A.trace()), float(A.det())
        ([(2,), (3,)], 7.0, 4.0)
    """

    def __init__(
        self,
        blocks: Sequence[LinearOperator],
        positions: Sequence[Sequence[int]] | None = None,
    ):
        """Store the blocks and their positions.

        Args:
            blocks: The diagonal blocks (same dtype and device). Each block must have as many
                input entries as output entries.
            positions: For each block, the indices of the overall tensor-list entries it acts
                on (``len(positions[b]) == len(blocks[b].in_shapes)``); together a partition
                of ``range(L)``. Default: consecutive entries in block order.

        Raises:
            TypeError: If a block is not a :class:`LinearOperator` or dtypes differ.
            ValueError: If the list is empty, devices differ, a block has different numbers
                of input and output entries, or ``positions`` is not a valid partition.
        """
        if isinstance(blocks, LinearOperator) or not isinstance(blocks, (list, tuple)):
            raise TypeError(f"blocks must be a list of LinearOperators, got {type(blocks)}.")
        if len(blocks) == 0:
            raise ValueError("blocks is empty; pass at least one block.")
        for b, block in enumerate(blocks):
            _check_block(b, block, blocks[0])
        counts = [len(block.in_shapes) for block in blocks]
        positions = _check_positions(positions, counts)

        total = sum(counts)
        in_shapes: list = [None] * total
        out_shapes: list = [None] * total
        for block, pos in zip(blocks, positions):
            for j, p in enumerate(pos):
                in_shapes[p] = block.in_shapes[j]
                out_shapes[p] = block.out_shapes[j]
        super().__init__(in_shapes, out_shapes, dtype=blocks[0].dtype, device=blocks[0].device)
        self._blocks = tuple(blocks)
        self._positions = positions
        self.is_self_adjoint = all(block.is_self_adjoint for block in blocks)
        self.is_psd = all(block.is_psd for block in blocks)

    @property
    def blocks(self) -> tuple[LinearOperator, ...]:
        """The diagonal blocks."""
        return self._blocks

    @property
    def positions(self) -> tuple[tuple[int, ...], ...]:
        """For each block, the indices of the tensor-list entries it acts on."""
        return self._positions

    # ---------------------------------------------------------------- products
    def _blockwise(self, X: list[Tensor], adjoint: bool) -> list[Tensor]:
        out: list = [None] * len(X)
        for block, pos in zip(self._blocks, self._positions):
            op = block.adjoint() if adjoint else block
            for p, y in zip(pos, op._matmat([X[p] for p in pos])):
                out[p] = y
        return out

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._blockwise(X, adjoint=False)

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._blockwise(X, adjoint=True)

    def adjoint(self) -> BlockDiagonalLinearOperator:
        """Return the block-diagonal operator of the blocks' adjoints."""
        if self.is_self_adjoint:
            return self
        return BlockDiagonalLinearOperator(
            [block.adjoint() for block in self._blocks], self._positions
        )

    def __mul__(self, c):
        scale = as_scalar(c)
        if scale is None:
            return NotImplemented
        return BlockDiagonalLinearOperator(
            [block * scale for block in self._blocks], self._positions
        )

    __rmul__ = __mul__

    def __neg__(self) -> BlockDiagonalLinearOperator:
        return self * -1.0

    def to_dense(self) -> Tensor:
        """Assemble the dense ``[D_out, D_in]`` matrix from the blocks' dense matrices."""
        in_off = _offsets(self._in_shapes)
        out_off = _offsets(self._out_shapes)
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for block, pos in zip(self._blocks, self._positions):
            block_dense = block.to_dense()
            local_in, local_out = _offsets(block.in_shapes), _offsets(block.out_shapes)
            for i, p in enumerate(pos):
                rows_global = slice(out_off[p], out_off[p + 1])
                rows_local = slice(local_out[i], local_out[i + 1])
                for j, q in enumerate(pos):
                    dense[rows_global, in_off[q] : in_off[q + 1]] = block_dense[
                        rows_local, local_in[j] : local_in[j + 1]
                    ]
        return dense

    # ---------------------------------------------------------------- closed forms
    def _call(self, name: str, *args) -> list:
        """Call method ``name`` on every block, naming the block that lacks it."""
        results = []
        for b, block in enumerate(self._blocks):
            method = getattr(block, name, None)
            if method is None:
                raise TypeError(
                    f"Block {b} ({type(block).__name__}) has no method `{name}()`, so the "
                    f"block-diagonal operator cannot compute it blockwise. Use a structured "
                    f"block from curvops.structured."
                )
            results.append(method(*args))
        return results

    def _require_aligned(self, what: str) -> None:
        in_sizes = [prod(s) for s in self._in_shapes]
        out_sizes = [prod(s) for s in self._out_shapes]
        if in_sizes != out_sizes:
            raise ValueError(
                f"{what} requires that every tensor-list entry has as many input as output "
                f"entries (so the blocks sit on the diagonal), got input sizes {in_sizes} and "
                f"output sizes {out_sizes}."
            )

    def trace(self) -> Tensor:
        """Trace :math:`\\sum_b \\operatorname{tr}(B_b)`."""
        self._require_aligned("trace()")
        return torch.stack(self._call("trace")).sum()

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm :math:`(\\sum_b \\|B_b\\|_F^2)^{1/2}`."""
        return torch.stack(self._call("frobenius_norm")).square().sum().sqrt()

    def det(self) -> Tensor:
        """Determinant :math:`\\prod_b \\det(B_b)`."""
        self._require_aligned("det()")
        return torch.stack(self._call("det")).prod()

    def logdet(self) -> Tensor:
        """Log-determinant :math:`\\sum_b \\log\\det(B_b)` (NOTE [log-determinant semantics]).

        Raises:
            ValueError: If a block's determinant is negative (even when an even number of
                negative block determinants would make the product positive).
        """
        self._require_aligned("logdet()")
        return torch.stack(self._call("logdet")).sum()

    def diagonal(self) -> Tensor:
        """Diagonal ``[D]`` (flat), assembled from the blocks' diagonals."""
        self._require_aligned("diagonal()")
        entries: list = [None] * len(self._in_shapes)
        for block, pos, diag in zip(self._blocks, self._positions, self._call("diagonal")):
            if isinstance(diag, (list, tuple)):
                diag = torch.cat([d.reshape(-1) for d in diag])
            sizes = [prod(s) for s in block.in_shapes]
            for p, d in zip(pos, diag.split(sizes)):
                entries[p] = d
        return torch.cat(entries)

    def inverse(self, damping: float = 0.0) -> BlockDiagonalLinearOperator:
        """Return :math:`\\operatorname{blockdiag}((B_b + \\delta I)^{-1})` on the same positions.

        Args:
            damping: :math:`\\delta \\geq 0`, passed to every block's ``inverse``.

        Returns:
            The inverse as a :class:`BlockDiagonalLinearOperator`.
        """
        damping = check_damping(damping)
        return BlockDiagonalLinearOperator(self._call("inverse", damping), self._positions)


def _offsets(shapes: Sequence[Sequence[int]]) -> list[int]:
    offsets = [0]
    for s in shapes:
        offsets.append(offsets[-1] + prod(s))
    return offsets


def _check_block(b: int, block: object, first: LinearOperator) -> None:
    if not isinstance(block, LinearOperator):
        raise TypeError(f"Block {b} is a {type(block).__name__}, not a LinearOperator.")
    if len(block.in_shapes) != len(block.out_shapes):
        raise ValueError(
            f"Block {b} ({type(block).__name__}) maps {len(block.in_shapes)} input entries to "
            f"{len(block.out_shapes)} output entries; blocks must map as many entries as they "
            f"consume."
        )
    if block.dtype != first.dtype:
        raise TypeError(
            f"Block {b} has dtype {block.dtype}, but block 0 has dtype {first.dtype}. Build "
            f"all blocks with one dtype."
        )
    if block.device != first.device:
        raise ValueError(
            f"Block {b} lives on device {block.device}, but block 0 lives on {first.device}. "
            f"Build all blocks on one device."
        )


def _check_positions(
    positions: Sequence[Sequence[int]] | None, counts: list[int]
) -> tuple[tuple[int, ...], ...]:
    """Validate that ``positions`` partitions ``range(sum(counts))`` (or build the default)."""
    total = sum(counts)
    if positions is None:
        starts = _offsets([(c,) for c in counts])
        return tuple(tuple(range(starts[b], starts[b + 1])) for b in range(len(counts)))
    if len(positions) != len(counts):
        raise ValueError(f"Got {len(positions)} position lists for {len(counts)} blocks.")
    owner: dict[int, int] = {}
    result = []
    for b, (pos, count) in enumerate(zip(positions, counts)):
        pos = tuple(pos)
        if any(isinstance(p, bool) or not isinstance(p, Integral) for p in pos):
            raise TypeError(f"positions[{b}] must contain ints, got {pos}.")
        pos = tuple(int(p) for p in pos)
        if len(pos) != count:
            raise ValueError(
                f"positions[{b}] has {len(pos)} indices, but block {b} acts on {count} "
                f"tensor-list entries."
            )
        for p in pos:
            if not 0 <= p < total:
                raise ValueError(
                    f"positions[{b}] contains {p}, outside range({total}) (the blocks act on "
                    f"{total} entries in total)."
                )
            if p in owner:
                raise ValueError(
                    f"Entry {p} appears in the positions of blocks {owner[p]} and {b}; the "
                    f"positions must partition range({total})."
                )
            owner[p] = b
        result.append(pos)
    return tuple(result)
