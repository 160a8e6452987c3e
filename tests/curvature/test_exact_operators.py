"""Exact curvature operators against independent dense float64 references (torch.func)."""

import pytest
import torch
from cases import FISHER_CASES, SAME_SHAPE_CASES, case_ids, make_case

from curvops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvops.testing import assert_operator_matches
from curvops.testing.dense import (
    dense_ef,
    dense_ggn,
    dense_gradient_and_loss,
    dense_hessian,
    dense_jacobian,
)

TOL = {"rtol": 1e-8, "atol": 1e-10}


def _kwargs(case):
    return {"batch_size_fn": case.batch_size_fn}


@pytest.mark.parametrize("name", case_ids())
def test_hessian(name):
    case = make_case(name)
    H = HessianLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, **_kwargs(case)
    )
    dense = dense_hessian(case.model_func, case.loss_func, case.params, case.data, **_kwargs(case))
    assert_operator_matches(H, dense, **TOL)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "auto"])
def test_hessian_modes(mode):
    case = make_case("mlp-ce-mean")
    H = HessianLinearOperator(case.model_func, case.loss_func, case.params, case.data, mode=mode)
    assert_operator_matches(
        H, dense_hessian(case.model_func, case.loss_func, case.params, case.data), **TOL
    )
    if mode == "auto":
        assert H._product_plan.hessian_mode is not None  # probed at the first product


def test_hessian_rejects_unknown_mode():
    case = make_case("mlp-ce-mean")
    with pytest.raises(ValueError, match="Unknown Hessian mode 'sideways'"):
        HessianLinearOperator(
            case.model_func, case.loss_func, case.params, case.data, mode="sideways"
        )


@pytest.mark.parametrize("name", case_ids())
def test_ggn(name):
    case = make_case(name)
    G = GGNLinearOperator(case.model_func, case.loss_func, case.params, case.data, **_kwargs(case))
    dense = dense_ggn(case.model_func, case.loss_func, case.params, case.data, **_kwargs(case))
    assert_operator_matches(G, dense, **TOL)


@pytest.mark.parametrize("gradient_of", ["loss-term", "datum"])
@pytest.mark.parametrize("name", FISHER_CASES)
def test_empirical_fisher(name, gradient_of):
    case = make_case(name)
    args = (case.model_func, case.loss_func, case.params, case.data)
    E = EFLinearOperator(*args, gradient_of=gradient_of, **_kwargs(case))
    assert E.gradient_of == gradient_of
    assert_operator_matches(E, dense_ef(*args, gradient_of=gradient_of, **_kwargs(case)), **TOL)


def test_empirical_fisher_default_is_per_loss_term():
    """One gradient per position of a sequence (as empirical KFAC-expand), not per sequence."""
    case = make_case("seq-mse-varlen-mean")
    args = (case.model_func, case.loss_func, case.params, case.data)
    E = EFLinearOperator(*args).to_dense()
    torch.testing.assert_close(E, dense_ef(*args, gradient_of="loss-term"), **TOL)
    per_datum = dense_ef(*args, gradient_of="datum")
    assert (E - per_datum).norm() > 0.1 * per_datum.norm()


def test_empirical_fisher_rejects_unknown_convention():
    case = make_case("mlp-ce-mean")
    with pytest.raises(ValueError, match="Unknown gradient_of='token'"):
        EFLinearOperator(
            case.model_func, case.loss_func, case.params, case.data, gradient_of="token"
        )
    with pytest.raises(TypeError, match="takes no gradient_of"):
        FisherMCLinearOperator(
            case.model_func, case.loss_func, case.params, case.data, gradient_of="datum"
        )


@pytest.mark.parametrize("name", case_ids())
def test_gradient_and_loss(name):
    """The risk and its gradient: the mean over all loss terms of all batches."""
    case = make_case(name)
    args = (case.model_func, case.loss_func, case.params, case.data)
    grads, loss = GGNLinearOperator(*args, **_kwargs(case)).gradient_and_loss()
    g_ref, loss_ref = dense_gradient_and_loss(*args, **_kwargs(case))
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), g_ref, **TOL)


def test_jacobian_refuses_outputs_of_different_shapes():
    case = make_case("seq-ce-varlen-mean")
    with pytest.raises(ValueError, match=r"batch 1 gives \[N_B, \*\[3, 5\]\]"):
        JacobianLinearOperator(case.model_func, case.params, case.data)


@pytest.mark.parametrize("name", SAME_SHAPE_CASES)
def test_jacobians(name):
    case = make_case(name)
    J = JacobianLinearOperator(case.model_func, case.params, case.data, **_kwargs(case))
    dense = dense_jacobian(case.model_func, case.params, case.data, **_kwargs(case))
    assert_operator_matches(J, dense, **TOL)
    JT = TransposedJacobianLinearOperator(case.model_func, case.params, case.data, **_kwargs(case))
    assert_operator_matches(JT, dense.T, **TOL)


@pytest.mark.parametrize(
    "name", ["mlp-ce-mean", "mlp-mse-sum", "mlp-bce-mean", "seq-ce-padded-mean"]
)
def test_mc_fisher_in_expectation(name):
    """The MC Fisher's average over seeds converges to the (type-I) Fisher = GGN."""
    case = make_case(name)
    ggn = dense_ggn(case.model_func, case.loss_func, case.params, case.data)
    F = FisherMCLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, mc_samples=2000, seed=1
    )
    F_dense = F.to_dense()
    assert_operator_matches(F, F_dense, **TOL)  # a fixed matrix through every entry point
    rel = (F_dense - ggn).norm() / ggn.norm()
    # error of an S-sample average shrinks like 1/sqrt(S); with S=2000 it is a few percent
    assert rel < 0.08, rel
    F_few = FisherMCLinearOperator(
        case.model_func, case.loss_func, case.params, case.data, mc_samples=1, seed=1
    ).to_dense()
    assert (F_few - ggn).norm() / ggn.norm() > rel  # and is larger with fewer samples


def test_mc_fisher_seed_changes_matrix():
    case = make_case("mlp-ce-mean")
    args = (case.model_func, case.loss_func, case.params, case.data)
    F1 = FisherMCLinearOperator(*args, seed=1).to_dense()
    F1b = FisherMCLinearOperator(*args, seed=1).to_dense()
    F2 = FisherMCLinearOperator(*args, seed=2).to_dense()
    torch.testing.assert_close(F1, F1b)
    assert not torch.allclose(F1, F2)


def test_batching_never_changes_the_matrix():
    """Three uneven batches give the same operator as one batch with all data."""
    for name in ["mlp-ce-mean", "mlp-mse-sum", "cnn-ce-mean"]:
        case = make_case(name)
        X = torch.cat([X for X, _ in case.data])
        y = torch.cat([y for _, y in case.data])
        for cls in (HessianLinearOperator, GGNLinearOperator, EFLinearOperator):
            split = cls(case.model_func, case.loss_func, case.params, case.data).to_dense()
            whole = cls(case.model_func, case.loss_func, case.params, [(X, y)]).to_dense()
            torch.testing.assert_close(split, whole, **TOL)
