"""Tests of ``curvops.structured.diagonal``."""

import pytest
import torch

from curvops.structured import DiagonalLinearOperator
from curvops.testing import assert_operator_matches

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _list_diag(seed=0):
    return [_rand(2, 3, seed=seed), _rand(4, seed=seed + 1), _rand(1, seed=seed + 2)]


def _flat(entries):
    return torch.cat([e.reshape(-1) for e in entries])


def test_flat_entry_points():
    d = _rand(6)
    op = DiagonalLinearOperator(d)
    assert op.in_shapes == [(6,)] and op.is_self_adjoint
    assert_operator_matches(op, torch.diag(d))


def test_list_entry_points():
    entries = _list_diag()
    op = DiagonalLinearOperator(entries)
    assert op.in_shapes == op.out_shapes == [(2, 3), (4,), (1,)]
    assert_operator_matches(op, torch.diag(_flat(entries)))


def test_psd_flag():
    assert DiagonalLinearOperator(torch.tensor([0.0, 1.0], dtype=F64)).is_psd
    assert not DiagonalLinearOperator(torch.tensor([-1e-3, 1.0], dtype=F64)).is_psd


@pytest.mark.parametrize("as_list", [False, True])
def test_closed_forms(as_list):
    entries = [e.abs() + 0.1 for e in _list_diag(seed=3)]
    entries[1][0] *= -1  # one negative entry...
    entries[0][0, 0] *= -1  # ...and a second one: positive determinant
    op = DiagonalLinearOperator(entries if as_list else _flat(entries))
    A = torch.diag(_flat(entries))
    torch.testing.assert_close(op.trace(), torch.trace(A))
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(A))
    torch.testing.assert_close(op.det(), torch.linalg.det(A))
    torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(A)[1])
    diag = op.diagonal()
    if as_list:
        assert isinstance(diag, list)
        for got, expected in zip(diag, entries):
            torch.testing.assert_close(got, expected)
    else:
        torch.testing.assert_close(diag, torch.diagonal(A))


@pytest.mark.parametrize("damping", [0.0, 0.5])
@pytest.mark.parametrize("as_list", [False, True])
def test_inverse(as_list, damping):
    entries = [e.abs() + 0.1 for e in _list_diag(seed=4)]
    op = DiagonalLinearOperator(entries if as_list else _flat(entries))
    inv = op.inverse(damping=damping)
    assert isinstance(inv, DiagonalLinearOperator) and inv.in_shapes == op.in_shapes
    assert isinstance(inv.diagonal(), list) == as_list
    expected = torch.linalg.inv(torch.diag(_flat(entries)) + damping * torch.eye(11, dtype=F64))
    assert_operator_matches(inv, expected)


def test_logdet_zero_entry_is_minus_inf():
    assert DiagonalLinearOperator(torch.tensor([0.0, 2.0], dtype=F64)).logdet() == -float("inf")


def test_diagonal_returns_copy():
    d = _rand(3)
    op = DiagonalLinearOperator(d)
    op.diagonal().zero_()
    assert_operator_matches(op, torch.diag(d))


def test_scaling_and_algebra():
    entries = _list_diag(seed=5)
    op = DiagonalLinearOperator(entries)
    A = torch.diag(_flat(entries))
    scaled = 3.0 * op
    assert isinstance(scaled, DiagonalLinearOperator)
    assert_operator_matches(scaled, 3.0 * A)
    assert_operator_matches(-op, -A)
    assert_operator_matches(op @ op - op, A @ A - A)


# ------------------------------------------------------------------ errors
def test_error_bad_inputs():
    with pytest.raises(ValueError, match="flat diagonal must be 1-D"):
        DiagonalLinearOperator(_rand(2, 2))
    with pytest.raises(ValueError, match="list is empty"):
        DiagonalLinearOperator([])
    with pytest.raises(TypeError, match="tensor or a list of tensors"):
        DiagonalLinearOperator(3.0)
    with pytest.raises(TypeError, match=r"diagonal\[1\] must be a torch.Tensor"):
        DiagonalLinearOperator([_rand(2), 1.0])
    with pytest.raises(TypeError, match="must be floating point"):
        DiagonalLinearOperator(torch.arange(3))


def test_error_dtype_device_mismatch():
    with pytest.raises(TypeError, match=r"diagonal\[1\] has dtype torch.float32"):
        DiagonalLinearOperator([_rand(2), torch.ones(3)])
    with pytest.raises(ValueError, match=r"diagonal\[1\] lives on device meta"):
        DiagonalLinearOperator([_rand(2), torch.ones(3, dtype=F64, device="meta")])


def test_error_singular_and_negative_det():
    op = DiagonalLinearOperator(torch.tensor([0.0, -2.0], dtype=F64))
    with pytest.raises(ValueError, match="entry plus damping 0.0 is zero"):
        op.inverse()
    with pytest.raises(ValueError, match="not positive definite"):
        DiagonalLinearOperator(torch.tensor([1.0, -2.0], dtype=F64)).logdet()


def test_error_product_with_wrong_shapes():
    op = DiagonalLinearOperator(_list_diag())
    with pytest.raises(ValueError, match="Expected a tensor list with 3 entries"):
        op @ [_rand(2, 3)]
