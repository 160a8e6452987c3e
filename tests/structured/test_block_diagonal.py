"""Tests of ``curvops.structured.block_diagonal``."""

from math import prod

import pytest
import torch

from curvops.structured import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    EigendecompositionLinearOperator,
    IdentityLinearOperator,
    KroneckerProductLinearOperator,
    TensorLinearOperator,
)
from curvops.testing import assert_operator_matches

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _spd(n, seed=0):
    X = _rand(n, n, seed=seed)
    return X @ X.T / n + 0.5 * torch.eye(n, dtype=F64)


def _blocks_and_dense(symmetric=True):
    """Square structured blocks with their dense ground truths, built from the raw tensors."""
    M = _spd(5, seed=1) if symmetric else _rand(5, 5, seed=1) + 3 * torch.eye(5, dtype=F64)
    G, A = _spd(2, seed=2), _spd(3, seed=3)
    d = [_rand(2, seed=4).abs() + 0.1, _rand(1, 2, seed=5).abs() + 0.1]
    Q = torch.linalg.qr(_rand(4, 4, seed=6))[0]
    lam = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)
    blocks = [
        TensorLinearOperator(M, [(2,), (3,)], [(2,), (3,)]),  # 2 entries
        KroneckerProductLinearOperator(G, A),  # 1 entry (2, 3)
        DiagonalLinearOperator(d),  # 2 entries (2,), (1, 2)
        IdentityLinearOperator([(3,)], dtype=F64, device="cpu", scale=1.5),  # 1 entry
        EigendecompositionLinearOperator(Q, lam, [(2, 2)]),  # 1 entry
    ]
    denses = [
        M,
        torch.einsum("ai,bj->abij", G, A).reshape(6, 6),
        torch.diag(torch.cat([t.reshape(-1) for t in d])),
        1.5 * torch.eye(3, dtype=F64),
        Q @ torch.diag(lam) @ Q.T,
    ]
    return blocks, denses


INTERLEAVED = [(4, 0), (6,), (1, 5), (2,), (3,)]


def _assemble(blocks, denses, positions, in_shapes, out_shapes):
    """Dense ground truth: scatter each block's dense matrix to its global index ranges."""

    def offsets(shapes):
        out = [0]
        for s in shapes:
            out.append(out[-1] + prod(s))
        return out

    in_off, out_off = offsets(in_shapes), offsets(out_shapes)
    rows = torch.cat([torch.arange(out_off[p], out_off[p + 1]) for pos in positions for p in pos])
    cols = torch.cat([torch.arange(in_off[p], in_off[p + 1]) for pos in positions for p in pos])
    C = torch.block_diag(*denses)
    dense = torch.zeros(out_off[-1], in_off[-1], dtype=F64)
    dense[rows[:, None], cols[None, :]] = C
    return dense


def test_consecutive_positions():
    blocks, denses = _blocks_and_dense()
    op = BlockDiagonalLinearOperator(blocks)
    assert op.positions == ((0, 1), (2,), (3, 4), (5,), (6,))
    assert op.in_shapes == [(2,), (3,), (2, 3), (2,), (1, 2), (3,), (2, 2)]
    assert op.is_self_adjoint and not op.is_psd  # the Tensor/Kronecker blocks are not declared
    assert_operator_matches(op, torch.block_diag(*denses))


def test_interleaved_positions():
    blocks, denses = _blocks_and_dense(symmetric=False)
    op = BlockDiagonalLinearOperator(blocks, INTERLEAVED)
    assert op.in_shapes == [(3,), (2,), (3,), (2, 2), (2,), (1, 2), (2, 3)]
    assert not op.is_self_adjoint
    dense = _assemble(blocks, denses, INTERLEAVED, op.in_shapes, op.out_shapes)
    assert_operator_matches(op, dense)
    assert isinstance(op.adjoint(), BlockDiagonalLinearOperator)
    assert_operator_matches(op.adjoint(), dense.T)


def test_rectangular_blocks_interleaved():
    M1 = _rand(3, 5, seed=7)
    M2 = _rand(4, 2, seed=8)
    blocks = [
        TensorLinearOperator(M1, [(2,), (3,)], [(1,), (2,)]),
        KroneckerProductLinearOperator(M2),
    ]
    positions = [(2, 0), (1,)]
    op = BlockDiagonalLinearOperator(blocks, positions)
    assert op.in_shapes == [(3,), (2,), (2,)] and op.out_shapes == [(2,), (4,), (1,)]
    dense = _assemble(blocks, [M1, M2], positions, op.in_shapes, op.out_shapes)
    assert_operator_matches(op, dense)
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(dense))


@pytest.mark.parametrize("positions", [None, INTERLEAVED], ids=["consecutive", "interleaved"])
def test_closed_forms(positions):
    blocks, denses = _blocks_and_dense()
    op = BlockDiagonalLinearOperator(blocks, positions)
    dense = _assemble(blocks, denses, op.positions, op.in_shapes, op.out_shapes)
    torch.testing.assert_close(op.trace(), torch.trace(dense))
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(dense))
    torch.testing.assert_close(op.diagonal(), torch.diagonal(dense))
    torch.testing.assert_close(op.det(), torch.linalg.det(dense))
    torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(dense)[1])


@pytest.mark.parametrize("damping", [0.0, 0.2])
@pytest.mark.parametrize("positions", [None, INTERLEAVED], ids=["consecutive", "interleaved"])
def test_inverse(positions, damping):
    blocks, denses = _blocks_and_dense()
    op = BlockDiagonalLinearOperator(blocks, positions)
    dense = _assemble(blocks, denses, op.positions, op.in_shapes, op.out_shapes)
    inv = op.inverse(damping=damping)
    assert isinstance(inv, BlockDiagonalLinearOperator) and inv.positions == op.positions
    expected = torch.linalg.inv(dense + damping * torch.eye(dense.shape[0], dtype=F64))
    assert_operator_matches(inv, expected)


def test_nested_block_diagonal():
    blocks, denses = _blocks_and_dense()
    inner = BlockDiagonalLinearOperator(blocks[:2], [(2, 0), (1,)])
    op = BlockDiagonalLinearOperator([blocks[3], inner], [(3,), (2, 0, 1)])
    inner_dense = _assemble(
        blocks[:2], denses[:2], inner.positions, inner.in_shapes, inner.out_shapes
    )
    dense = _assemble(
        [blocks[3], inner], [denses[3], inner_dense], op.positions, op.in_shapes, op.out_shapes
    )
    assert_operator_matches(op, dense)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(dense))
    assert_operator_matches(op.inverse(0.1), torch.linalg.inv(dense + 0.1 * torch.eye(14).double()))


def test_scaling_and_algebra():
    blocks, denses = _blocks_and_dense()
    op = BlockDiagonalLinearOperator(blocks, INTERLEAVED)
    dense = _assemble(blocks, denses, INTERLEAVED, op.in_shapes, op.out_shapes)
    scaled = 2.0 * op
    assert isinstance(scaled, BlockDiagonalLinearOperator)
    assert_operator_matches(scaled, 2.0 * dense)
    torch.testing.assert_close(scaled.trace(), 2.0 * torch.trace(dense))
    assert_operator_matches(-op, -dense)
    eye = IdentityLinearOperator(op.in_shapes, dtype=F64, device="cpu")
    assert_operator_matches(op + 0.1 * eye, dense + 0.1 * torch.eye(dense.shape[0], dtype=F64))


def test_read_only_properties():
    blocks, _ = _blocks_and_dense()
    op = BlockDiagonalLinearOperator(blocks)
    assert op.blocks == tuple(blocks)
    with pytest.raises(AttributeError):
        op.blocks = ()
    with pytest.raises(AttributeError):
        op.positions = ()


# ------------------------------------------------------------------ errors
def test_error_bad_blocks():
    eye = IdentityLinearOperator([(2,)], dtype=F64, device="cpu")
    with pytest.raises(TypeError, match="blocks must be a list of LinearOperators"):
        BlockDiagonalLinearOperator(eye)
    with pytest.raises(ValueError, match="blocks is empty"):
        BlockDiagonalLinearOperator([])
    with pytest.raises(TypeError, match="Block 1 is a Tensor, not a LinearOperator"):
        BlockDiagonalLinearOperator([eye, torch.eye(2)])
    with pytest.raises(TypeError, match="Block 1 has dtype torch.float32"):
        BlockDiagonalLinearOperator(
            [eye, IdentityLinearOperator([(2,)], dtype=torch.float32, device="cpu")]
        )
    with pytest.raises(ValueError, match="Block 1 lives on device meta"):
        BlockDiagonalLinearOperator([eye, IdentityLinearOperator([(2,)], dtype=F64, device="meta")])
    uneven = TensorLinearOperator(_rand(3, 3), [(2,), (1,)], [(3,)])
    with pytest.raises(ValueError, match="Block 1 .* maps 2 input entries to 1 output entries"):
        BlockDiagonalLinearOperator([eye, uneven])


def test_error_bad_positions():
    blocks, _ = _blocks_and_dense()
    with pytest.raises(ValueError, match="Got 2 position lists for 5 blocks"):
        BlockDiagonalLinearOperator(blocks, [(0,), (1,)])
    with pytest.raises(ValueError, match=r"positions\[0\] has 1 indices, but block 0 acts on 2"):
        BlockDiagonalLinearOperator(blocks, [(0,), (1, 2), (3, 4), (5,), (6,)])
    with pytest.raises(ValueError, match=r"positions\[4\] contains 7, outside range\(7\)"):
        BlockDiagonalLinearOperator(blocks, [(0, 1), (2,), (3, 4), (5,), (7,)])
    with pytest.raises(ValueError, match="Entry 1 appears in the positions of blocks 0 and 1"):
        BlockDiagonalLinearOperator(blocks, [(0, 1), (1,), (3, 4), (5,), (6,)])
    with pytest.raises(TypeError, match=r"positions\[1\] must contain ints"):
        BlockDiagonalLinearOperator(blocks, [(0, 1), (2.0,), (3, 4), (5,), (6,)])


def test_error_block_lacks_method():
    T = TensorLinearOperator(_spd(2))
    op = BlockDiagonalLinearOperator([T, T + T])
    dense = torch.block_diag(_spd(2), 2 * _spd(2))
    assert_operator_matches(op, dense)
    # a lazy sum has the trace and diagonal of its terms, but no other closed form
    torch.testing.assert_close(op.trace(), dense.trace())
    torch.testing.assert_close(op.diagonal(), dense.diagonal())
    for method in ("logdet", "det", "frobenius_norm", "inverse"):
        with pytest.raises(
            TypeError,
            match=rf"Block 1 \(_SumLinearOperator\) has no method "
            rf"`{method}\(\)`",
        ):
            getattr(op, method)()


def test_error_closed_forms_need_aligned_entries():
    M = _rand(3, 2)
    op = BlockDiagonalLinearOperator(
        [TensorLinearOperator(M), TensorLinearOperator(M.T.contiguous())]
    )
    assert op.shape == (5, 5)
    for method in ("trace", "logdet", "det", "diagonal"):
        with pytest.raises(ValueError, match=rf"{method}\(\) requires that every tensor-list"):
            getattr(op, method)()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        op.inverse(damping=-1)
