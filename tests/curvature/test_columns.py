"""Multi-column products and dense matrices (NOTE [columns per pass], [dense Gram matrices]).

Every path against dense float64 references built independently with ``torch.func``
(:mod:`curvops.testing.dense`), through every entry point (:func:`assert_operator_matches`:
flat vector, flat matrix, tensor lists, ``X @ A``, ``to_dense()``, SciPy).
"""

from __future__ import annotations

import pytest
import torch
from cases import make_case

import curvops.curvature.dense as dense_module
from curvops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from curvops.curvature.products import columns_per_pass
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ef, dense_ggn, dense_hessian

TOL = {"rtol": 1e-9, "atol": 1e-11}
CLASSES = {
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc": FisherMCLinearOperator,
    "hessian": HessianLinearOperator,
}
# several batches (4, 3, 5 data) unless the name says otherwise; mean and sum; positions with
# ignore_index padding; a convolution (looped backward); a loss without a likelihood
CASES = ["mlp-ce-mean", "mlp-mse-sum", "seq-ce-padded-mean", "cnn-ce-mean", "single-batch-mse-sum"]


def _build(kind: str, case, **kwargs):
    kwargs = {"batch_size_fn": case.batch_size_fn} | kwargs
    if kind == "mc":
        kwargs = {"mc_samples": 2, "seed": 3} | kwargs
    return CLASSES[kind](case.model_func, case.loss_func, case.params, case.data, **kwargs)


def _reference(kind: str, case) -> torch.Tensor:
    args = (case.model_func, case.loss_func, case.params, case.data)
    kw = {"batch_size_fn": case.batch_size_fn}
    if kind == "ggn":
        return dense_ggn(*args, **kw)
    if kind == "ef":
        return dense_ef(*args, **kw)
    if kind == "hessian":
        return dense_hessian(*args, **kw)
    # the MC Fisher's own matrix: one lone product per unit vector, same seed
    op = _build("mc", case)
    eye = torch.eye(op.shape[1], dtype=op.dtype)
    return torch.stack([op @ e for e in eye], dim=1)


@pytest.mark.parametrize("max_columns", [None, 3])
@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("name", CASES)
def test_every_entry_point_matches_the_dense_reference(name, kind, max_columns):
    """K = 1 and K = 7 (three passes of at most 3 columns, the last one ragged), to_dense."""
    case = make_case(name)
    if kind in ("ef", "mc") and not case.supports_fisher:
        pytest.skip("no likelihood")
    op = _build(kind, case, max_columns_per_pass=max_columns)
    assert_operator_matches(op, _reference(kind, case), num_columns=7, **TOL)
    chosen = op._product_plan.columns_per_pass  # None: one column at a time (NOTE [batched
    if max_columns is not None and chosen is not None:  # or looped backward], Hessian)
        assert chosen <= max_columns


@pytest.mark.parametrize("kind", list(CLASSES))
def test_the_option_bounds_the_columns_per_pass(kind):
    """7 columns, at most 3 per pass: 3 passes per batch (3 batches); a 1-byte budget: 7."""
    case = make_case("mlp-ce-mean")
    V = torch.randn(sum(p.numel() for p in case.params), 7, dtype=torch.float64)
    op = _build(kind, case, max_columns_per_pass=3)
    op @ V
    plan = op._product_plan
    assert (plan.columns_per_pass, plan.column_passes) == (3, 9)
    tiny = _build(kind, case, column_memory_budget=1)
    torch.testing.assert_close(tiny @ V, op @ V, **TOL)
    plan = tiny._product_plan
    assert (plan.columns_per_pass, plan.column_passes) == (1, 21)
    roomy = _build(kind, case)
    roomy @ V
    assert (roomy._product_plan.columns_per_pass, roomy._product_plan.column_passes) == (7, 3)


def test_columns_per_pass_from_the_budget():
    assert columns_per_pass(10, 100, 400) == 4  # 4, 4, 2 -> three passes, evened: 4
    assert columns_per_pass(9, 100, 400) == 3  # three passes of 3
    assert columns_per_pass(10, 100, 10**9) == 10
    assert columns_per_pass(10, 100, 10**9, max_columns=5) == 5
    assert columns_per_pass(10, 10**9, 1) == 1
    assert columns_per_pass(1, 100, 400) == 1


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_options_are_checked(value):
    case = make_case("mlp-ce-mean")
    error = TypeError if isinstance(value, (bool, float)) else ValueError
    with pytest.raises(error, match="max_columns_per_pass"):
        _build("ggn", case, max_columns_per_pass=value)
    with pytest.raises(error, match="column_memory_budget"):
        _build("ggn", case, column_memory_budget=value)


@pytest.mark.parametrize("kind", ["ggn", "ef", "mc"])
@pytest.mark.parametrize("name", ["mlp-ce-mean", "seq-ce-padded-mean", "mlp-mse-sum"])
def test_gram_and_products_give_the_same_dense_matrix(name, kind, monkeypatch):
    """NOTE [dense Gram matrices]: forced on and off, and a small budget (chunks of data)."""
    case = make_case(name)
    if kind in ("ef", "mc") and not case.supports_fisher:
        pytest.skip("no likelihood")
    reference = _reference(kind, case)
    monkeypatch.setattr(dense_module, "GRAM_MAX_COLUMNS_PER_DATUM", 10**6)
    gram = _build(kind, case, column_memory_budget=2_000).to_dense()
    torch.testing.assert_close(gram, reference, **TOL)
    monkeypatch.setattr(dense_module, "GRAM_MAX_COLUMNS_PER_DATUM", 0)
    monkeypatch.setattr(dense_module, "GRAM_MAX_COLUMN_ENTRIES", 0)
    # declined after the MC labels were drawn: the products draw the same labels again
    products = _build(kind, case, max_columns_per_pass=4).to_dense()
    torch.testing.assert_close(products, reference, **TOL)


def test_mc_fisher_is_one_matrix_across_columns_and_chunks():
    """Same seed: the same matrix for K = 1, K = 7 in chunks of 3 or at once, and to_dense."""
    case = make_case("seq-ce-padded-mean")
    D = sum(p.numel() for p in case.params)
    V = torch.randn(D, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = _build("mc", case).to_dense()
    for max_columns in (None, 3, 1):
        op = _build("mc", case, max_columns_per_pass=max_columns)
        torch.testing.assert_close(op @ V, dense @ V, **TOL)
        torch.testing.assert_close(op @ V[:, 0], dense @ V[:, 0], **TOL)
    other = _build("mc", case, seed=4).to_dense()
    assert (other - dense).abs().max() > 1e-6 * dense.abs().max()


def test_small_operators_take_the_gram_matrix_with_many_columns_per_datum():
    """A last layer of 10 classes (D = 50): the Gram matrix, though 10 columns > 8 per datum."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 10).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 10, (6,))
    G = GGNLinearOperator(layer, torch.nn.CrossEntropyLoss(), list(layer.parameters()), [(X, y)])
    dense = G.to_dense()
    assert G._product_plan.column_passes == 0  # no product with the identity ran
    torch.testing.assert_close(dense, G @ torch.eye(50, dtype=torch.float64))
