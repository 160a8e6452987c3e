"""Properties of the exact operators (GGN, Hessian, EF, MC Fisher) on random problems.

For random small MLP / CNN / sequence models, each loss and reduction, and two random uneven
batchings of the same data (sequence lengths differing between batches, ``ignore_index``
padding): the matrices, their exact diagonals and ``gradient_and_loss`` do not depend on the
batching (to 1e-12 relative in float64), match the dense ``torch.func`` references of
:mod:`curvops.testing`, are symmetric, PSD for the GGN and the Fisher types, and linear.
"""

import torch
from helpers.property_problems import flat, problems, rel_error
from hypothesis import given, note
from hypothesis import strategies as st

from curvops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from curvops.testing import dense_ef, dense_ggn, dense_gradient_and_loss, dense_hessian

SPLIT_RTOL = 1e-12  # batch-split invariance, relative to the largest entry
DENSE_RTOL = 1e-10  # against the dense references (different summation orders)

EXACT_KINDS = ("ggn", "hessian", "ef", "ef-datum", "mc")
DIAGONAL_KINDS = ("ggn", "ef", "ef-datum", "mc")  # the Hessian has no exact diagonal
PSD_KINDS = ("ggn", "ef", "ef-datum", "mc")


def build(kind, problem, data, **kwargs):
    """The exact operator ``kind`` over ``data``."""
    args = (problem.model, problem.loss_func, problem.params, data)
    kwargs = {"check_deterministic": False} | kwargs
    if kind == "ggn":
        return GGNLinearOperator(*args, **kwargs)
    if kind == "hessian":
        return HessianLinearOperator(*args, **kwargs)
    if kind == "ef":
        return EFLinearOperator(*args, gradient_of="loss-term", **kwargs)
    if kind == "ef-datum":
        return EFLinearOperator(*args, gradient_of="datum", **kwargs)
    assert kind == "mc"
    return FisherMCLinearOperator(*args, **({"mc_samples": 2, "seed": 3} | kwargs))


def nonempty(data):
    """The batches with loss terms.

    Batches of empty sequences add nothing; the references leave them out because
    ``torch.func.jacrev`` through ``nn.Embedding`` fails on an empty index tensor (PyTorch:
    "EmbeddingBackward0 returned an invalid gradient ... got [V, 0]").
    """
    return [(X, y) for X, y in data if y.numel() > 0]


def dense_reference(kind, problem, data):
    """The dense ``torch.func`` reference of ``kind`` (``None`` for the MC Fisher)."""
    args = (problem.model, problem.loss_func, problem.params, nonempty(data))
    if kind == "ggn":
        return dense_ggn(*args)
    if kind == "hessian":
        return dense_hessian(*args)
    if kind == "ef":
        return dense_ef(*args, gradient_of="loss-term")
    if kind == "ef-datum":
        return dense_ef(*args, gradient_of="datum")
    return None


def describe(problem):
    note(
        f"arch={problem.arch} loss={problem.loss_name} reduction={problem.reduction} "
        f"seed={problem.seed} lengths={problem.lengths} split_a={problem.split_a} "
        f"split_b={problem.split_b}"
    )


@given(problem=problems(), kind=st.sampled_from(EXACT_KINDS))
def test_matrix_split_invariant_symmetric_psd_and_dense(problem, kind):
    describe(problem)
    data_a, data_b = problem.batches(problem.split_a), problem.batches(problem.split_b)
    A = build(kind, problem, data_a).to_dense()
    B = build(kind, problem, data_b).to_dense()
    if kind != "mc":
        assert rel_error(B, A) <= SPLIT_RTOL, f"{kind}: batch split changes the matrix"
    assert rel_error(A.T, A) <= SPLIT_RTOL, f"{kind}: not symmetric"
    if kind in PSD_KINDS:
        eigs = torch.linalg.eigvalsh(A)
        assert eigs.min() >= -1e-12 * eigs.abs().max().clamp_min(1e-300), f"{kind}: not PSD"
    reference = dense_reference(kind, problem, data_a)
    if reference is not None:
        assert rel_error(A, reference) <= DENSE_RTOL, f"{kind}: differs from torch.func"


@given(problem=problems(), kind=st.sampled_from(EXACT_KINDS), data=st.data())
def test_products_are_linear(problem, kind, data):
    describe(problem)
    op = build(kind, problem, problem.batches(problem.split_a))
    a, b = data.draw(st.floats(-3, 3)), data.draw(st.floats(-3, 3))
    gen = torch.Generator().manual_seed(problem.seed)
    u, v = (torch.randn(op.shape[1], generator=gen, dtype=op.dtype) for _ in range(2))
    lhs = op @ (a * u + b * v)
    rhs = a * (op @ u) + b * (op @ v)
    scale = (op @ u).abs().max() + (op @ v).abs().max()
    assert (lhs - rhs).abs().max() <= 1e-12 * scale.clamp_min(1e-300) * (1 + abs(a) + abs(b))
    # matrix products are column-wise vector products
    UV = torch.stack([u, v], dim=1)
    assert rel_error(op @ UV, torch.stack([op @ u, op @ v], dim=1)) <= 1e-12


@given(problem=problems(), kind=st.sampled_from(DIAGONAL_KINDS))
def test_diagonal_split_invariant_and_exact(problem, kind):
    describe(problem)
    op_a = build(kind, problem, problem.batches(problem.split_a))
    op_b = build(kind, problem, problem.batches(problem.split_b))
    d_a, d_b = op_a.diagonal(), op_b.diagonal()
    assert rel_error(d_b, d_a) <= SPLIT_RTOL, f"{kind}: batch split changes the diagonal"
    assert rel_error(d_a, op_a.to_dense().diagonal()) <= DENSE_RTOL, f"{kind}: wrong diagonal"


@given(problem=problems())
def test_gradient_and_loss_split_invariant_and_dense(problem):
    describe(problem)
    data_a = problem.batches(problem.split_a)
    grad_a, loss_a = build("ggn", problem, data_a).gradient_and_loss()
    grad_b, loss_b = build("ggn", problem, problem.batches(problem.split_b)).gradient_and_loss()
    assert rel_error(flat(grad_b), flat(grad_a)) <= SPLIT_RTOL
    assert abs(float(loss_b - loss_a)) <= SPLIT_RTOL * max(abs(float(loss_a)), 1e-300)
    grad_ref, loss_ref = dense_gradient_and_loss(
        problem.model, problem.loss_func, problem.params, nonempty(data_a)
    )
    assert rel_error(flat(grad_a), grad_ref) <= DENSE_RTOL
    assert abs(float(loss_a - loss_ref)) <= DENSE_RTOL * abs(float(loss_ref))


@given(
    problem=problems(archs=("seq", "lm"), losses=("ce",)),
    kind=st.sampled_from(EXACT_KINDS),
)
def test_padding_with_ignore_index_changes_nothing(problem, kind):
    """A position-wise model: padding the sequences to one length is the same data set."""
    describe(problem)
    A = build(kind, problem, problem.whole()).to_dense()
    P = build(kind, problem, problem.padded_batches()).to_dense()
    assert rel_error(P, A) <= SPLIT_RTOL


@given(problem=problems(), mc_samples=st.integers(1, 3))
def test_mc_fisher_split_invariant_with_same_seed(problem, mc_samples):
    """The would-be labels are drawn datum by datum: a batching does not change them."""
    describe(problem)
    kwargs = {"mc_samples": mc_samples, "seed": problem.seed}
    A = build("mc", problem, problem.batches(problem.split_a), **kwargs)
    B = build("mc", problem, problem.batches(problem.split_b), **kwargs)
    assert rel_error(B.to_dense(), A.to_dense()) <= SPLIT_RTOL
    assert rel_error(B.diagonal(), A.diagonal()) <= SPLIT_RTOL
