"""Every routine of ``curvops.linalg`` runs on the operator's device and dtype.

Parametrized over float32/float64 and every available device (CUDA runs where a GPU is
present, else those cases are skipped). With a CPU generator, the random draws of one dtype
are the same on every device (NOTE [estimator randomness]), so results are compared with the
CPU run of the same dtype. Rademacher draws are also the same across dtypes, while Gaussian
ones are not; routines whose result does not depend on the Gaussian draws (up to their
tolerance) are also compared with the float64 run.
"""

import pytest
import torch
from helpers.linalg_problems import generator, matrix_with_spectrum

import curvops.linalg as la
from curvops.structured import TensorLinearOperator

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = [
    pytest.param(device, dtype, id=f"{device}-{dtype}", marks=[NO_CUDA] if device == "cuda" else [])
    for device in ("cpu", "cuda")
    for dtype in (torch.float32, torch.float64)
]


def _matrix():
    lam = torch.linspace(0.5, 2.0, 40, dtype=torch.float64)
    lam[-3:] = torch.tensor([5.0, 7.0, 9.0], dtype=torch.float64)
    return matrix_with_spectrum(lam, seed=0)


def _run_all(M: torch.Tensor):
    """All routines on the (symmetric positive definite) matrix M; returns named results."""
    A = TensorLinearOperator(M, symmetric=True, psd=True)
    b = torch.linspace(-1.0, 1.0, M.shape[0], dtype=torch.float64).to(M)
    out = {
        "cg": la.CGInverseLinearOperator(A, tolerance=1e-6) @ b,
        "lsmr": la.LSMRInverseLinearOperator(A, tolerance=1e-6) @ b,
        "neumann": la.NeumannInverseLinearOperator(A, num_terms=200, scale=0.2) @ b,
        "submatrix": la.SubmatrixLinearOperator(A, [0, 3], [1, 2, 5]) @ b[:3],
        "eigsh": la.eigsh(A, 3, tol=1e-5, generator=generator(1))[0],
    }
    for name in ("hutchinson_trace", "hutchpp_trace", "xtrace", "hutchinson_diag", "xdiag"):
        out[name] = getattr(la, name)(A, 12, generator=generator(2))
    out["fro"] = la.hutchinson_squared_fro_halved(A, 8, generator=generator(3))
    grid, density = la.lanczos_approximate_spectrum(
        A, ncv=20, num_repeats=2, num_points=1024, generator=generator(4)
    )
    out["density_mass"] = torch.trapezoid(density, grid)
    approx = la.nystrom_approximation(A, 3, generator=generator(5))
    out["nystrom"] = approx.eigenvalues
    out["randomized_eigh"] = la.randomized_eigh(A, 3, generator=generator(6)).eigenvalues
    out["error"] = la.estimate_approximation_error(A, approx, generator=generator(7))
    return out


DEPENDS_ON_GAUSSIAN_DRAWS = {"nystrom", "error", "xtrace"}  # xtrace: sphere vectors


@pytest.mark.parametrize("device, dtype", CASES)
def test_results_keep_device_and_dtype_and_match_cpu(device, dtype):
    M = _matrix()
    same_dtype_cpu = _run_all(M.to(dtype))
    float64_cpu = _run_all(M)
    results = _run_all(M.to(device=device, dtype=dtype))
    single = dtype == torch.float32
    for name, value in results.items():
        assert value.device.type == device and value.dtype == dtype, name
        tol = 1e-4 if single else 1e-8
        torch.testing.assert_close(value.cpu(), same_dtype_cpu[name], rtol=tol, atol=tol)
        if name not in DEPENDS_ON_GAUSSIAN_DRAWS:
            tol = 1e-3 if single else 1e-12
            torch.testing.assert_close(value.cpu().double(), float64_cpu[name], rtol=tol, atol=tol)


def test_global_rng_untouched_when_a_generator_is_given():
    state = torch.get_rng_state()
    _run_all(_matrix())
    assert torch.equal(torch.get_rng_state(), state)


def test_string_options_accept_enum_members():
    M = _matrix()
    a = la.hutchinson_trace(M, 4, distribution=la.Distribution.NORMAL, generator=generator(0))
    b = la.hutchinson_trace(M, 4, distribution="normal", generator=generator(0))
    assert a == b
    assert la.eigsh(M, 1, which=la.Which.SA, generator=generator(1))[0] < 0.6
    approx = la.nystrom_approximation(M, 3, generator=generator(2))
    assert la.estimate_approximation_error(M, approx, norm=la.ErrorNorm.SPECTRAL) > 0


def test_default_budgets_allow_the_papers_snippets():
    """E.g. ``diag_H_inv = 1 / hutchinson_diag(H)`` from the paper's OBS pruning snippet."""
    H = TensorLinearOperator(_matrix())
    diag_H_inv = 1 / la.hutchinson_diag(H, generator=generator(0))
    assert diag_H_inv.shape == (40,) and bool((diag_H_inv > 0).all())
    for name in ("hutchinson_trace", "hutchpp_trace", "xtrace", "xdiag"):
        getattr(la, name)(H, generator=generator(1))
    for name in ("hutchinson_squared_fro", "hutchinson_squared_fro_halved"):
        assert getattr(la, name)(H, generator=generator(2)) > 0
