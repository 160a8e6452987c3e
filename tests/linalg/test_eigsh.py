"""Tests of ``curvops.linalg.eigsh``."""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from helpers.linalg_problems import (
    DTYPE,
    counting,
    generator,
    matrix_with_spectrum,
    random_indefinite,
)

from curvops.linalg import eigsh
from curvops.structured import TensorLinearOperator


def _assert_same_eigenvectors(V, U, atol=1e-8):
    """Columns agree up to sign (eigenvalues must be simple)."""
    overlaps = (V * U).sum(0).abs()
    torch.testing.assert_close(overlaps, torch.ones_like(overlaps), rtol=0, atol=atol)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_agrees_with_scipy_eigsh(which):
    M = random_indefinite(120, seed=0)
    shapes = [(10, 2), (100,)]
    A = TensorLinearOperator(M, shapes, shapes)
    evals, evecs = eigsh(A, 4, which=which, generator=generator(0))
    ref_vals, ref_vecs = scipy.sparse.linalg.eigsh(A.to_scipy(), 4, which=which)
    assert evecs.shape == (120, 4)
    torch.testing.assert_close(evals, torch.from_numpy(ref_vals), rtol=1e-10, atol=1e-10)
    _assert_same_eigenvectors(evecs, torch.from_numpy(ref_vecs))
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(4, dtype=DTYPE), rtol=0, atol=1e-10)


def test_largest_magnitude_picks_both_ends_like_scipy():
    lam = torch.linspace(-1.0, 1.0, 60, dtype=DTYPE)
    lam[:2] = torch.tensor([-9.0, -7.0], dtype=DTYPE)
    lam[-2:] = torch.tensor([6.0, 8.0], dtype=DTYPE)
    M = matrix_with_spectrum(lam, seed=1)
    evals, evecs = eigsh(M, 3, which="LM", generator=generator(1))
    torch.testing.assert_close(evals, torch.tensor([-9.0, -7.0, 8.0], dtype=DTYPE))
    torch.testing.assert_close(M @ evecs, evecs * evals, rtol=1e-9, atol=1e-9)
    ref_vals, _ = scipy.sparse.linalg.eigsh(M.numpy(), 3, which="LM")
    np.testing.assert_allclose(evals.numpy(), ref_vals, rtol=1e-10)


@pytest.mark.parametrize(
    "spectrum, tol, max_ratio",
    [("outliers", 1e-6, 0.7), ("indefinite", None, 0.85)],
)
def test_warm_start_cuts_products(spectrum, tol, max_ratio):
    if spectrum == "outliers":
        lam = torch.linspace(0.0, 1.0, 150, dtype=DTYPE)
        lam[-5:] = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0], dtype=DTYPE)
        M = matrix_with_spectrum(lam, seed=2)
    else:
        M = random_indefinite(150, seed=0)
    _, old_vecs = eigsh(M, 5, generator=generator(2))
    # the operator changes a little (e.g. a Hessian after an optimizer step)
    E = torch.randn(150, 150, generator=generator(3), dtype=DTYPE)
    M_new = M + 1e-5 * (E + E.T) / 2
    cold, warm, warm_vec = counting(M_new), counting(M_new), counting(M_new)
    cold_vals, _ = eigsh(cold, 5, tol=tol, generator=generator(4))
    warm_vals, warm_vecs = eigsh(warm, 5, tol=tol, v0=old_vecs, generator=generator(4))
    vec_vals, _ = eigsh(warm_vec, 5, tol=tol, v0=old_vecs[:, -1], generator=generator(4))
    ref_vals, ref_vecs = torch.linalg.eigh(M_new)
    for vals in (cold_vals, warm_vals, vec_vals):
        torch.testing.assert_close(vals, ref_vals[-5:], rtol=1e-8, atol=1e-8)
    _assert_same_eigenvectors(warm_vecs, ref_vecs[:, -5:], atol=1e-4 if tol else 1e-8)
    assert warm.num_columns <= max_ratio * cold.num_columns
    assert cold.num_columns == cold.num_calls  # Lanczos: one column per product


def test_small_problem_with_full_basis_is_exact():
    M = random_indefinite(8, seed=3)
    evals, evecs = eigsh(M, 3, which="SA", ncv=8, generator=generator(5))
    ref_vals, ref_vecs = torch.linalg.eigh(M)
    torch.testing.assert_close(evals, ref_vals[:3], rtol=1e-12, atol=1e-12)
    _assert_same_eigenvectors(evecs, ref_vecs[:, :3])


def test_low_rank_operator_survives_lanczos_breakdown():
    U = torch.randn(50, 3, generator=generator(6), dtype=DTYPE)
    M = U @ U.T  # rank 3: the Krylov space becomes invariant after 3 steps
    evals, evecs = eigsh(M, 5, generator=generator(7))
    ref_vals = torch.linalg.eigvalsh(M)[-5:]
    torch.testing.assert_close(evals, ref_vals, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M @ evecs, evecs * evals, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(5, dtype=DTYPE), rtol=0, atol=1e-10)


def test_generator_reproducible_and_global_rng_untouched():
    M = random_indefinite(40, seed=4)
    state = torch.get_rng_state()
    a = eigsh(M, 2, generator=generator(8))
    b = eigsh(M, 2, generator=generator(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[1], b[1])


def test_not_converged_raises():
    M = random_indefinite(100, seed=5)
    with pytest.raises(RuntimeError, match="converged within max_iter=1.*Increase max_iter"):
        eigsh(M, 4, max_iter=1, generator=generator(9))


def test_bad_inputs_raise():
    M = random_indefinite(10, seed=6)
    with pytest.raises(ValueError, match="requires a symmetric operator.*eigs"):
        eigsh(torch.triu(M), 2)
    with pytest.raises(ValueError, match="requires a square operator"):
        eigsh(torch.ones(3, 4, dtype=DTYPE), 1)
    with pytest.raises(ValueError, match="Unknown which 'BE'"):
        eigsh(M, 2, which="BE")
    with pytest.raises(ValueError, match="k < D eigenpairs.*torch.linalg.eigh"):
        eigsh(M, 10)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        eigsh(M, 0)
    with pytest.raises(ValueError, match="ncv must satisfy k < ncv <= D, i.e. 3 < ncv <= 10"):
        eigsh(M, 3, ncv=3)
    with pytest.raises(ValueError, match=r"v0 must be a tensor of shape \[10\]"):
        eigsh(M, 2, v0=torch.ones(9, dtype=DTYPE))
    with pytest.raises(ValueError, match="v0 must be non-zero"):
        eigsh(M, 2, v0=torch.zeros(10, dtype=DTYPE))
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        eigsh(M, 2, tol=0.0)


def test_progressbar_runs(capsys):
    eigsh(random_indefinite(30, seed=7), 2, progressbar=True, generator=generator(10))
    assert "eigsh" in capsys.readouterr().err
