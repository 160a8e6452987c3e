"""Properties of KFAC and EKFAC on random problems.

For random small MLP / CNN / sequence models, each loss, reduction, Fisher type and KFAC
flavour: the Kronecker factors (and EKFAC's matrix) do not depend on how the data are cut into
batches (to 1e-12 relative in float64; NOTE [KFAC scaling] of
:mod:`curvops.kronecker.factors`), padding sequences with ``ignore_index`` changes nothing for
a position-wise model, and the matrices are symmetric positive semi-definite.
"""

import torch
from helpers.property_problems import problems, rel_error
from hypothesis import assume, given, note
from hypothesis import strategies as st

from curvops import EKFACLinearOperator, KFACLinearOperator
from curvops.testing import dense_ef, dense_ggn

SPLIT_RTOL = 1e-12
FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
APPROX = ("expand", "reduce")


def describe(problem, **options):
    # documented limitation: an embedding's reduce factor would be a dense V x V matrix
    assume(not (problem.arch == "lm" and options.get("kfac_approx") == "reduce"))
    note(
        f"arch={problem.arch} loss={problem.loss_name} reduction={problem.reduction} "
        f"seed={problem.seed} lengths={problem.lengths} split_a={problem.split_a} "
        f"split_b={problem.split_b} options={options}"
    )


def kfac(cls, problem, data, **options):
    return cls(
        problem.model,
        problem.loss_func,
        problem.params,
        data,
        check_deterministic=False,
        seed=problem.seed,
        **options,
    )


def assert_factors_equal(fa, fb):
    assert fa.keys() == fb.keys()
    for name in fa:
        a, b = fa[name], fb[name]
        for attr in ("input_factor", "gradient_factor", "bias_input_factor"):
            ta, tb = getattr(a, attr), getattr(b, attr)
            assert (ta is None) == (tb is None), f"{name}.{attr}"
            if ta is not None:
                err = rel_error(tb, ta)
                assert err <= SPLIT_RTOL, f"{name}.{attr}: batch split changes it by {err:.2e}"


def assert_symmetric_psd(M, what):
    assert rel_error(M.T, M) <= SPLIT_RTOL, f"{what}: not symmetric"
    eigs = torch.linalg.eigvalsh(M)
    assert eigs.min() >= -1e-12 * eigs.abs().max().clamp_min(1e-300), f"{what}: not PSD"


@given(
    problem=problems(),
    fisher_type=st.sampled_from(FISHER_TYPES),
    kfac_approx=st.sampled_from(APPROX),
    separate=st.booleans(),
)
def test_kfac_factors_split_invariant_and_psd(problem, fisher_type, kfac_approx, separate):
    options = {
        "fisher_type": fisher_type,
        "kfac_approx": kfac_approx,
        "separate_weight_and_bias": separate,
    }
    describe(problem, **options)
    K_a = kfac(KFACLinearOperator, problem, problem.batches(problem.split_a), **options)
    K_b = kfac(KFACLinearOperator, problem, problem.batches(problem.split_b), **options)
    assert_factors_equal(K_a.factors, K_b.factors)
    assert_symmetric_psd(K_a.to_dense(), "KFAC")


@given(
    problem=problems(),
    fisher_type=st.sampled_from(("type-2", "mc", "empirical")),
    kfac_approx=st.sampled_from(APPROX),
)
def test_ekfac_split_invariant_and_psd(problem, fisher_type, kfac_approx):
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx}
    describe(problem, **options)
    E_a = kfac(EKFACLinearOperator, problem, problem.batches(problem.split_a), **options)
    E_b = kfac(EKFACLinearOperator, problem, problem.batches(problem.split_b), **options)
    assert_factors_equal(E_a.factors, E_b.factors)
    A, B = E_a.to_dense(), E_b.to_dense()
    assert_symmetric_psd(A, "EKFAC")
    # the eigenbasis of nearly repeated factor eigenvalues is ill-conditioned: compare the
    # matrices with a tolerance relative to the factors' conditioning
    assert rel_error(B, A) <= 1e-8, "EKFAC: batch split changes the matrix"


@given(
    problem=problems(archs=("seq", "lm"), losses=("ce",)),
    fisher_type=st.sampled_from(FISHER_TYPES),
    kfac_approx=st.sampled_from(APPROX),
)
def test_kfac_padding_with_ignore_index_changes_nothing(problem, fisher_type, kfac_approx):
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx}
    describe(problem, **options)
    K = kfac(KFACLinearOperator, problem, problem.whole(), **options)
    P = kfac(KFACLinearOperator, problem, problem.padded_batches(), **options)
    assert_factors_equal(K.factors, P.factors)


def _ekfac_target(problem, data, fisher_type, kfac_approx):
    """The exact matrix EKFAC's correction reads its eigenvalues from."""
    # without the batches of empty sequences (they add nothing; torch.func's jacrev through
    # nn.Embedding fails on them)
    data = [(X, y) for X, y in data if y.numel() > 0]
    args = (problem.model, problem.loss_func, problem.params, data)
    if fisher_type == "type-2":
        return dense_ggn(*args)
    gradient_of = "loss-term" if kfac_approx == "expand" else "datum"
    return dense_ef(*args, gradient_of=gradient_of)


@given(
    problem=problems(),
    fisher_type=st.sampled_from(("type-2", "empirical")),
    kfac_approx=st.sampled_from(APPROX),
    separate=st.booleans(),
)
def test_ekfac_is_the_projection_of_its_target(problem, fisher_type, kfac_approx, separate):
    r"""EKFAC's eigenvalues are the target's diagonal in the Kronecker eigenbasis.

    So EKFAC :math:`E` is the Frobenius projection of the exact matrix :math:`G` onto the
    matrices diagonal in its basis, which holds for every choice of eigenvectors (repeated
    eigenvalues): :math:`\langle G - E, E^p \rangle_F = 0` for :math:`p = 0, 1, 2`.
    """
    options = {
        "fisher_type": fisher_type,
        "kfac_approx": kfac_approx,
        "separate_weight_and_bias": separate,
    }
    describe(problem, **options)
    data = problem.batches(problem.split_a)
    E = kfac(EKFACLinearOperator, problem, data, **options).to_dense()
    G = _ekfac_target(problem, data, fisher_type, kfac_approx)
    # E is block-diagonal, so only G's diagonal blocks enter the inner products
    scale = float((G * G).sum().sqrt()) + 1e-300
    P = torch.eye(E.shape[0], dtype=E.dtype)
    for p in range(3):
        residual = float(((G - E) * P).sum())
        norm = float((P * P).sum().sqrt())
        assert abs(residual) <= 1e-9 * scale * norm, f"<G - E, E^{p}> = {residual:.3e}"
        P = P @ E
