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


@pytest.mark.parametrize("block_size", [None, 1])
@pytest.mark.parametrize(
    "spectrum, tol, max_ratio",
    [("outliers", 1e-6, 0.7), ("indefinite", None, 0.85)],
)
def test_warm_start_cuts_products(spectrum, tol, max_ratio, block_size):
    if spectrum == "outliers":
        lam = torch.linspace(0.0, 1.0, 150, dtype=DTYPE)
        lam[-5:] = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0], dtype=DTYPE)
        M = matrix_with_spectrum(lam, seed=2)
    else:
        M = random_indefinite(150, seed=0)
    options = {"block_size": block_size, "generator": generator(4), "tol": tol}
    _, old_vecs = eigsh(M, 5, generator=generator(2), block_size=block_size)
    # the operator changes a little (e.g. a Hessian after an optimizer step)
    E = torch.randn(150, 150, generator=generator(3), dtype=DTYPE)
    M_new = M + 1e-5 * (E + E.T) / 2
    cold, warm, warm_vec = counting(M_new), counting(M_new), counting(M_new)
    cold_vals, _ = eigsh(cold, 5, **options)
    warm_vals, warm_vecs = eigsh(warm, 5, v0=old_vecs, **options)
    vec_vals, _ = eigsh(warm_vec, 5, v0=old_vecs[:, -1], **options)
    ref_vals, ref_vecs = torch.linalg.eigh(M_new)
    for vals in (cold_vals, warm_vals, vec_vals):
        torch.testing.assert_close(vals, ref_vals[-5:], rtol=1e-8, atol=1e-8)
    _assert_same_eigenvectors(warm_vecs, ref_vecs[:, -5:], atol=1e-4 if tol else 1e-8)
    assert warm.num_columns <= max_ratio * cold.num_columns
    if block_size == 1:
        assert cold.num_columns == cold.num_calls  # Lanczos: one column per product
    else:
        assert cold.num_columns == 5 * cold.num_calls  # block Lanczos: b = k columns each


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


# ---------------------------------------------------------------------------------------------
# repeated eigenvalues (block Lanczos, NOTE [Lanczos basis] in curvops.linalg.lanczos)

_SIGN = {"LA": 1.0, "SA": -1.0}


def _wantedness(lam, which):
    """A key that is larger for more wanted eigenvalues."""
    return lam.abs() if which == "LM" else _SIGN[which] * lam


def _reference(M, k, which):
    """The k wanted eigenvalues of M (ascending) by eigvalsh."""
    lam = torch.linalg.eigvalsh(M)
    order = torch.argsort(_wantedness(lam, which), descending=True, stable=True)
    return lam[order[:k]].sort().values


def _assert_spans_wanted_eigenspaces(M, evals, evecs, which, atol):
    """The eigenvectors span the right invariant subspace (projectors, not vectors).

    Every eigenvector more wanted than the k-th lies in span(evecs), and span(evecs) lies in
    the eigenspaces at least as wanted as the k-th; if the k-th ends a cluster, both
    projectors are equal.
    """
    lam, Q = torch.linalg.eigh(M)
    key = _wantedness(lam, which)
    key_k = _wantedness(evals, which).min()
    strict, inclusive = Q[:, key > key_k + 1e-6], Q[:, key >= key_k - 1e-6]
    P = evecs @ evecs.T
    torch.testing.assert_close(P @ strict, strict, rtol=0, atol=atol)
    torch.testing.assert_close(inclusive @ (inclusive.T @ evecs), evecs, rtol=0, atol=atol)
    if inclusive.shape[1] == evecs.shape[1]:
        torch.testing.assert_close(P, inclusive @ inclusive.T, rtol=0, atol=atol)


def _clustered_spectrum(kind, mu, D, seed):
    """Eigenvalues with a cluster of multiplicity mu; the rest simple (the bulk random).

    top: 4, 3 (x mu), 2, 1.6, bulk in [0, 1] (wanted: LA).
    null: 0 (x mu), 0.3, 0.5, bulk in [1, 3], a PSD matrix with a null space (SA).
    bottom: 6, -5 (x mu), -3, 2.5, bulk in [-1, 1] (LM).
    middle: 4, 3 (x mu), 2 (x 3), 1.5, bulk in [0, 1] (LA; a second cluster behind).
    """
    g = generator(100 + seed)
    bulk = torch.rand(D, generator=g, dtype=DTYPE)
    if kind == "top":
        head = [4.0] + [3.0] * mu + [2.0, 1.6]
    elif kind == "null":
        bulk = 1 + 2 * bulk
        head = [0.0] * mu + [0.3, 0.5]
    elif kind == "bottom":
        bulk = 2 * bulk - 1
        head = [6.0] + [-5.0] * mu + [-3.0, 2.5]
    else:
        head = [4.0] + [3.0] * mu + [2.0] * 3 + [1.5]
    bulk[: len(head)] = torch.tensor(head, dtype=DTYPE)
    return bulk


# (which, values of k relative to mu): into the cluster, up to its end, across it
_CLUSTER_CASES = {
    "top": ("LA", [0, 1, 3]),
    "null": ("SA", [-1, 0, 2]),
    "bottom": ("LM", [0, 1, 3]),
    "middle": ("LA", [0, 2, 5]),
}


@pytest.mark.parametrize("mu", [2, 5, 11])
@pytest.mark.parametrize("kind", list(_CLUSTER_CASES))
def test_repeated_eigenvalues_against_eigvalsh(kind, mu):
    """All copies of a repeated eigenvalue are found, at both ends and behind the top.

    Single-vector Lanczos finds one copy (and reports the next distinct eigenvalue instead
    of the others); five seeds per case, k into, up to the end of, and across the cluster.
    """
    which, offsets = _CLUSTER_CASES[kind]
    D = 80
    for offset in offsets:
        k = mu + offset
        for seed in range(5):
            M = matrix_with_spectrum(_clustered_spectrum(kind, mu, D, seed), seed)
            A = counting(M)
            evals, evecs = eigsh(A, k, which=which, generator=generator(seed))
            torch.testing.assert_close(evals, _reference(M, k, which), rtol=0, atol=1e-10)
            eye = torch.eye(k, dtype=DTYPE)
            torch.testing.assert_close(evecs.T @ evecs, eye, rtol=0, atol=1e-10)
            _assert_spans_wanted_eigenspaces(M, evals, evecs, which, atol=1e-8)
            assert A.num_columns <= k * A.num_calls  # block products of b = k columns


@pytest.mark.parametrize("mu", [5, 11])
@pytest.mark.parametrize("kind", list(_CLUSTER_CASES))
def test_repeated_eigenvalues_with_restarts(kind, mu):
    """A small basis (many thick restarts) keeps every copy of the cluster."""
    which, offsets = _CLUSTER_CASES[kind]
    for offset in offsets:
        k = mu + offset
        for seed in range(3):
            M = matrix_with_spectrum(_clustered_spectrum(kind, mu, 120, seed), seed)
            evals, evecs = eigsh(M, k, which=which, ncv=2 * k + 5, generator=generator(seed))
            torch.testing.assert_close(evals, _reference(M, k, which), rtol=0, atol=1e-10)
            _assert_spans_wanted_eigenspaces(M, evals, evecs, which, atol=1e-8)


def test_three_fold_top_and_two_fold_middle_eigenvalue():
    """The example of the issue: eigenvalues (5, 5, 5, 1, 1, 0, ...), k = 4, LA."""
    lam = torch.zeros(60, dtype=DTYPE)
    lam[:5] = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0], dtype=DTYPE)
    expected = torch.tensor([1.0, 5.0, 5.0, 5.0], dtype=DTYPE)
    for seed in range(10):
        M = matrix_with_spectrum(lam, seed)
        evals, evecs = eigsh(M, 4, which="LA", generator=generator(seed))
        torch.testing.assert_close(evals, expected, rtol=0, atol=1e-10)
        _assert_spans_wanted_eigenspaces(M, evals, evecs, "LA", atol=1e-8)


def test_block_size_one_is_single_vector_lanczos():
    M = random_indefinite(60, seed=11)
    A = counting(M)
    evals, _ = eigsh(A, 4, block_size=1, generator=generator(12))
    torch.testing.assert_close(evals, _reference(M, 4, "LA"), rtol=0, atol=1e-10)
    assert A.num_columns == A.num_calls


@pytest.mark.parametrize("num_columns", [2, 4, 7])
def test_warm_start_subspace_of_any_width(num_columns):
    """A [D, m] warm start is completed (m < b) or folded (m > b) into the start block."""
    lam = torch.linspace(0.0, 1.0, 70, dtype=DTYPE)
    lam[-4:] = 3.0  # a four-fold top eigenvalue
    M = matrix_with_spectrum(lam, seed=13)
    Q = torch.linalg.eigh(M)[1]
    v0 = Q[:, -num_columns:]  # (part of) the top eigenspace and the bulk's top
    evals, evecs = eigsh(M, 4, v0=v0, generator=generator(14))
    torch.testing.assert_close(evals, torch.full((4,), 3.0, dtype=DTYPE), rtol=0, atol=1e-10)
    _assert_spans_wanted_eigenspaces(M, evals, evecs, "LA", atol=1e-8)


# a small over-parametrized MLP whose GGN has an 11-dimensional null space (D = 31, rank 20)
@pytest.fixture(scope="module")
def ggn_with_null_space():
    from torch import nn

    from curvops import GGNLinearOperator
    from curvops.testing import dense_ggn

    g = generator(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    X = torch.randn(10, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (10,), generator=g)
    params = list(model.parameters())
    loss_func = nn.CrossEntropyLoss()
    G = GGNLinearOperator(model, loss_func, params, [(X, y)])
    dense = dense_ggn(model, loss_func, params, [(X, y)])
    lam = torch.linalg.eigvalsh(dense)
    assert (lam.abs() < 1e-12).sum() == 11 and lam[11] > 1e-5 * lam[-1]
    return G, dense


@pytest.mark.parametrize("k, which", [(3, "SA"), (11, "SA"), (13, "SA"), (5, "LA")])
def test_ggn_null_space(ggn_with_null_space, k, which):
    """Zeros of a real GGN: k = 3 returned [0, 2e-5, 6e-5] with single-vector Lanczos."""
    G, dense = ggn_with_null_space
    evals, evecs = eigsh(G, k, which=which, generator=generator(15))
    scale = float(torch.linalg.eigvalsh(dense)[-1])
    torch.testing.assert_close(evals, _reference(dense, k, which), rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(dense @ evecs, evecs * evals, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(k, dtype=DTYPE), rtol=0, atol=1e-10)
    _assert_spans_wanted_eigenspaces(dense, evals, evecs, which, atol=1e-8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_or_product_raises(bad):
    M = random_indefinite(20, seed=16)
    M[3, 5] = M[5, 3] = bad
    with pytest.raises(ValueError, match="eigsh: the matrix A contains NaN or Inf"):
        eigsh(M, 2)
    with pytest.raises(ValueError, match="eigsh: the matrix A contains NaN or Inf"):
        eigsh(TensorLinearOperator(M, symmetric=True), 2)
    with pytest.raises(FloatingPointError, match="product of the .* contains NaN or Inf"):
        eigsh(counting(M, symmetric=True), 2, generator=generator(17))


def test_bad_block_size_raises():
    M = random_indefinite(30, seed=18)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        eigsh(M, 2, block_size=0)
    with pytest.raises(ValueError, match="block_size must be at most ncv=10"):
        eigsh(M, 2, block_size=11, ncv=10)
    with pytest.raises(ValueError, match="must fit into the space of dimension D=30"):
        eigsh(M, 2, block_size=5, ncv=28)
