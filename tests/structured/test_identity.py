"""Tests of ``curvops.structured.identity``."""

import math

import pytest
import torch

from curvops.structured import IdentityLinearOperator, TensorLinearOperator
from curvops.testing import assert_operator_matches

F64 = torch.float64
SHAPES = [(2,), (1, 3)]


def _eye(scale=1.0):
    return IdentityLinearOperator(SHAPES, dtype=F64, device="cpu", scale=scale)


@pytest.mark.parametrize("scale", [1.0, 2.5, -0.5])
def test_entry_points(scale):
    op = _eye(scale)
    assert op.in_shapes == op.out_shapes == SHAPES
    assert op.is_self_adjoint and op.is_psd == (scale >= 0)
    assert op.scale == scale
    assert_operator_matches(op, scale * torch.eye(5, dtype=F64))


@pytest.mark.parametrize("scale", [1.0, 2.5, -0.5, 0.0])
def test_closed_forms(scale):
    op = _eye(scale)
    A = scale * torch.eye(5, dtype=F64)
    torch.testing.assert_close(op.trace(), torch.trace(A))
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(A))
    torch.testing.assert_close(op.diagonal(), torch.diagonal(A))
    torch.testing.assert_close(op.det(), torch.linalg.det(A))
    if scale >= 0:
        torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(A)[1])


def test_logdet_identity_is_zero_and_even_negative_power():
    assert float(_eye().logdet()) == 0.0
    op = IdentityLinearOperator([(2, 2)], dtype=F64, device="cpu", scale=-2.0)
    torch.testing.assert_close(op.logdet(), torch.tensor(4 * math.log(2.0), dtype=F64))


@pytest.mark.parametrize("scale, damping", [(1.0, 0.0), (2.0, 0.5), (-0.5, 0.25)])
def test_inverse(scale, damping):
    inv = _eye(scale).inverse(damping=damping)
    assert isinstance(inv, IdentityLinearOperator)
    assert inv.in_shapes == SHAPES
    expected = torch.linalg.inv((scale + damping) * torch.eye(5, dtype=F64))
    assert_operator_matches(inv, expected)


def test_scaling_and_damping_algebra():
    scaled = 0.1 * _eye()
    assert isinstance(scaled, IdentityLinearOperator) and scaled.scale == pytest.approx(0.1)
    assert isinstance(-_eye(), IdentityLinearOperator) and (-_eye()).scale == -1.0
    assert (_eye(3.0) / 2).scale == 1.5
    M = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    K = TensorLinearOperator(M, SHAPES, SHAPES)
    assert_operator_matches(K + 0.1 * _eye(), M + 0.1 * torch.eye(5, dtype=F64))
    assert_operator_matches(K @ _eye(2.0), 2.0 * M)


def test_float32():
    op = IdentityLinearOperator([(3,)], dtype=torch.float32, device="cpu", scale=2.0)
    assert op.trace().dtype == torch.float32
    assert_operator_matches(op, 2 * torch.eye(3))


# ------------------------------------------------------------------ errors
def test_error_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        IdentityLinearOperator(SHAPES, dtype=torch.int64, device="cpu")
    with pytest.raises(TypeError, match="scale must be a real number"):
        IdentityLinearOperator(SHAPES, dtype=F64, device="cpu", scale="2")
    with pytest.raises(ValueError, match="scale must be finite"):
        IdentityLinearOperator(SHAPES, dtype=F64, device="cpu", scale=math.inf)
    with pytest.raises(ValueError, match="must be a list of shapes"):
        IdentityLinearOperator([3], dtype=F64, device="cpu")
    with pytest.raises(ValueError, match="negative dimension"):
        IdentityLinearOperator([(2, -1)], dtype=F64, device="cpu")


def test_error_singular_and_negative_det():
    with pytest.raises(ValueError, match="scale \\+ damping = 0.0 \\+ 0.0 = 0"):
        _eye(0.0).inverse()
    with pytest.raises(ValueError, match="not positive definite"):
        _eye(-1.0).logdet()  # D = 5 is odd
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        _eye().inverse(damping=-0.1)


def test_error_input_dtype_mismatch():
    with pytest.raises(TypeError, match="dtype"):
        _eye() @ torch.zeros(5, dtype=torch.float32)
    with pytest.raises(ValueError, match="Cannot add operators with dtype/device"):
        _eye() + IdentityLinearOperator(SHAPES, dtype=torch.float32, device="cpu")
