"""Check a linear operator against a dense matrix through every entry point."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator


def assert_operator_matches(
    op: LinearOperator,
    dense: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    num_columns: int = 3,
    check_adjoint: bool = True,
    check_scipy: bool = True,
    seed: int = 0,
) -> None:
    """Assert that ``op`` represents ``dense`` through every entry point.

    Checks, with random inputs from a private generator: flat vector, flat matrix,
    tensor list (vector and matrix), left multiplication (vector and matrix),
    ``to_dense()``, the SciPy export (``matvec``, ``matmat``, ``rmatvec``), and that two
    consecutive products agree.

    Args:
        op: The operator under test.
        dense: Its dense ``[D_out, D_in]`` ground truth (same dtype and device as ``op``).
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        num_columns: Number of columns of the random test matrices.
        check_adjoint: Whether to also test left multiplication / the adjoint.
        check_scipy: Whether to also test the SciPy export.
        seed: Seed of the private generator drawing the test vectors.

    Raises:
        AssertionError: If any entry point disagrees with ``dense``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d_out, d_in = op.shape
    if tuple(dense.shape) != (d_out, d_in):
        raise AssertionError(f"op.shape={op.shape} but the dense matrix has {tuple(dense.shape)}")

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=op.dtype).to(op.device)

    def close(actual, expected, what):
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
        )

    # flat vector and flat matrix
    v = rand(d_in)
    Av = op @ v
    close(Av, dense @ v, "flat vector")
    close(op @ v, Av, "two consecutive products")
    V = rand(d_in, num_columns)
    close(op @ V, dense @ V, "flat matrix")

    # tensor list, vector and matrix
    v_list = [t.squeeze(-1) for t in op._flat_to_list(v.unsqueeze(-1), op.in_shapes)]
    Av_list = op @ v_list
    assert isinstance(Av_list, list) and len(Av_list) == len(op.out_shapes)
    close(
        op._list_to_flat([t.unsqueeze(-1) for t in Av_list]).squeeze(-1),
        dense @ v,
        "tensor list vector",
    )
    V_list = op._flat_to_list(V, op.in_shapes)
    AV_list = op @ V_list
    close(op._list_to_flat(AV_list), dense @ V, "tensor list matrix")

    # dense export
    close(op.to_dense(), dense, "to_dense()")

    if check_adjoint:
        u = rand(d_out)
        close(u @ op, u @ dense, "left multiplication (vector)")
        U = rand(num_columns, d_out)
        close(U @ op, U @ dense, "left multiplication (matrix)")

    if check_scipy:
        sp = op.to_scipy()
        dense_np = dense.detach().cpu().numpy()
        v_np = v.cpu().numpy()
        np.testing.assert_allclose(sp @ v_np, dense_np @ v_np, rtol=rtol, atol=atol)
        V_np = V.cpu().numpy()
        np.testing.assert_allclose(sp.matmat(V_np), dense_np @ V_np, rtol=rtol, atol=atol)
        if check_adjoint:
            u_np = rand(d_out).cpu().numpy()
            np.testing.assert_allclose(sp.rmatvec(u_np), dense_np.T @ u_np, rtol=rtol, atol=atol)
