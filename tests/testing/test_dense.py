"""Sanity checks of the dense references in ``curvops.testing.dense``.

The references are the ground truth of every curvature operator, so here they are checked
against second, independent computations: plain ``torch.autograd`` on the concatenated data
(double backward, no ``torch.func``), closed-form loss Hessians, finite differences, and
structural facts (GGN = Hessian for models linear in the parameters, symmetry, PSD-ness).
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import FISHER_CASES, SAME_SHAPE_CASES, Case, make_case
from torch import Tensor, nn

from curvops.testing.dense import (
    dense_block_diagonal,
    dense_ef,
    dense_ggn,
    dense_hessian,
    dense_jacobian,
)

DTYPE = torch.float64


# ==================================================================== test helpers
def _concat(xs):
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    return torch.cat(xs)


def _one_batch(case: Case) -> list[tuple]:
    """All of a case's data as a single batch."""
    return [(_concat([X for X, _ in case.data]), _concat([y for _, y in case.data]))]


def _slice(X, j: int):
    return {k: v[j : j + 1] for k, v in X.items()} if isinstance(X, dict) else X[j : j + 1]


def _forward(case: Case, X) -> Tensor:
    """Evaluate the case's model through ordinary autograd (no functional_call)."""
    if isinstance(case.model_func, nn.Module):
        return case.model_func(X)
    return case.model_func(case.params, X)


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _grad(scalar: Tensor, case: Case, create_graph: bool = False, **kwargs) -> Tensor:
    return _flat(torch.autograd.grad(scalar, case.param_list, create_graph=create_graph, **kwargs))


def _autograd_hessian(case: Case) -> Tensor:
    """Hessian of the risk on the concatenated data by double backward, row by row."""
    ((X, y),) = _one_batch(case)
    g = _grad(case.loss_func(_forward(case, X), y), case, create_graph=True)
    rows = [
        _flat(torch.autograd.grad(g_i, case.param_list, retain_graph=True, allow_unused=True))
        if g_i.requires_grad
        else torch.zeros_like(g)
        for g_i in g
    ]
    return torch.stack(rows).detach()


def _autograd_jacobian(case: Case, X) -> tuple[Tensor, Tensor]:
    """Output and its Jacobian ``[numel, D]`` w.r.t. the parameters, row by row."""
    out = _forward(case, X)
    flat = out.reshape(-1)
    rows = [_flat(torch.autograd.grad(o, case.param_list, retain_graph=True)) for o in flat]
    return out.detach(), torch.stack(rows)


def _term_weights(loss_func: nn.Module, y: Tensor) -> Tensor:
    """Weight of every loss term (position) by PyTorch's documented semantics, ``[N * P]``.

    Cross-entropy: ``weight[y]`` (1 without class weights), 0 at ``ignore_index``; other losses:
    1 per entry.
    """
    if not isinstance(loss_func, nn.CrossEntropyLoss):
        return torch.ones(y.numel(), dtype=DTYPE)
    y = y.reshape(-1)
    keep = y != loss_func.ignore_index
    w = torch.ones(y.shape, dtype=DTYPE)
    if loss_func.weight is not None:
        w = loss_func.weight[torch.where(keep, y, 0)].to(DTYPE)
    return w * keep


def _normaliser(loss_func: nn.Module, data) -> float:
    """The total 'mean' normaliser: summed term weights (CE) or entries, over all data."""
    if loss_func.reduction == "sum":
        return 1.0
    return float(sum(_term_weights(loss_func, y).sum() for _, y in data))


def _closed_form_output_hessian(
    loss_func: nn.Module, out: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Per-datum-sum output Hessian :math:`\nabla_f^2 \sum_n \ell_n` in closed form.

    Returns the Hessian in a class-last row order and the permutation that maps the
    row-major output order to it. Cross-entropy blocks are scaled by the term weights (label
    smoothing does not change them: the smoothed targets sum to one).
    """
    M = out.numel()
    name = type(loss_func).__name__
    if name == "MSELoss":
        return 2 * torch.eye(M, dtype=out.dtype), torch.arange(M)
    if name == "BCEWithLogitsLoss":
        s = torch.sigmoid(out).reshape(-1)
        return torch.diag(s * (1 - s)), torch.arange(M)
    # CrossEntropyLoss: class axis 1 -> move it last, then one softmax block per position
    C = out.shape[1]
    order = torch.arange(M).reshape(out.shape).movedim(1, -1).reshape(-1)
    p = torch.softmax(out.movedim(1, -1).reshape(-1, C), dim=-1)
    w = _term_weights(loss_func, y)
    blocks = [c * (torch.diag(p_i) - torch.outer(p_i, p_i)) for p_i, c in zip(p, w)]
    return torch.block_diag(*blocks), order


def _term_losses(loss_func: nn.Module, out: Tensor, y: Tensor) -> list[Tensor]:
    """The loss of every position of a one-datum output, each by its own loss call."""
    loss_sum = copy.copy(loss_func)
    loss_sum.reduction = "sum"
    if isinstance(loss_func, nn.CrossEntropyLoss):
        C = out.shape[1]
        out, y = out.reshape(1, C, -1), y.reshape(1, -1)
        return [loss_sum(out[:, :, t], y[:, t]) for t in range(out.shape[2])]
    D = out.shape[-1]
    out, y = out.reshape(-1, D), y.reshape(-1, D)
    return [loss_sum(out[t], y[t]) for t in range(out.shape[0])]


def _reference(kind: str, case: Case, data=None) -> Tensor:
    """One dense reference of a case, on its own data unless ``data`` is given."""
    data = case.data if data is None else data
    kw = {"batch_size_fn": case.batch_size_fn}
    if kind == "jacobian":
        return dense_jacobian(case.model_func, case.params, data, **kw)
    fn = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_ef}[kind]
    return fn(case.model_func, case.loss_func, case.params, data, **kw)


def _references(case: Case) -> dict[str, Tensor]:
    kinds = ["hessian", "ggn", "jacobian"] + (["ef"] if case.supports_fisher else [])
    return {kind: _reference(kind, case) for kind in kinds}


# ==================================================================== second computations
@pytest.mark.parametrize("name", SAME_SHAPE_CASES)
def test_hessian_matches_double_backward_on_concatenated_data(name: str):
    """Batched, rescaled torch.func Hessian == autograd Hessian of the one-batch risk."""
    case = make_case(name)
    H = dense_hessian(
        case.model_func, case.loss_func, case.params, case.data, batch_size_fn=case.batch_size_fn
    )
    torch.testing.assert_close(H, _autograd_hessian(case), rtol=1e-10, atol=1e-12)


def test_hessian_matches_double_backward_of_the_mean_over_all_terms(case: Case):
    """Hessian == autograd Hessian of (sum of all loss terms) / (documented normaliser).

    Works where the data cannot be concatenated (sequence lengths differ between batches);
    the normaliser is counted from PyTorch's documented semantics, not read off the loss.
    """
    loss_sum = copy.copy(case.loss_func)
    loss_sum.reduction = "sum"
    if isinstance(case.loss_func, nn.CrossEntropyLoss) or case.loss_func.reduction == "sum":
        Z = _normaliser(case.loss_func, case.data)
    else:  # element-wise and custom losses: one term per output entry
        Z = float(sum(_forward(case, X).numel() for X, _ in case.data))
    risk = sum(loss_sum(_forward(case, X), y) for X, y in case.data) / Z
    g = _grad(risk, case, create_graph=True)
    rows = [
        _flat(torch.autograd.grad(g_i, case.param_list, retain_graph=True, allow_unused=True))
        for g_i in g
    ]
    H = dense_hessian(
        case.model_func, case.loss_func, case.params, case.data, batch_size_fn=case.batch_size_fn
    )
    torch.testing.assert_close(H, torch.stack(rows).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in FISHER_CASES if n in SAME_SHAPE_CASES])
def test_ggn_matches_closed_form_loss_hessian(name: str):
    r"""GGN == Jᵀ Λ J / Z with J by autograd, Λ the known output Hessian, Z the normaliser."""
    case = make_case(name)
    ((X, y),) = _one_batch(case)
    out, J = _autograd_jacobian(case, X)
    Lam, order = _closed_form_output_hessian(case.loss_func, out, y)
    expected = J[order].T @ Lam @ J[order] / _normaliser(case.loss_func, case.data)
    G = dense_ggn(
        case.model_func, case.loss_func, case.params, case.data, batch_size_fn=case.batch_size_fn
    )
    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-12)


def _datum_data(case: Case, j: int):
    """Datum ``j`` of the first batch with a non-ignored target."""
    X, y = case.data[0]
    return _slice(X, j), y[j : j + 1]


@pytest.mark.parametrize("name", FISHER_CASES)
def test_ef_matches_chain_rule_for_one_datum(name: str):
    r"""For one datum E = R Jᵀ ∇_f ℓ (∇_f ℓ)ᵀ J, with J and ∇_f ℓ by plain autograd."""
    case = make_case(name)
    X1, y1 = _datum_data(case, 0)
    out, J = _autograd_jacobian(case, X1)
    out = out.requires_grad_(True)
    loss_sum = copy.copy(case.loss_func)
    loss_sum.reduction = "sum"
    (grad_out,) = torch.autograd.grad(loss_sum(out, y1), out)
    g = J.T @ grad_out.reshape(-1)
    R = 1 / _normaliser(case.loss_func, [(X1, y1)])
    E = dense_ef(
        case.model_func,
        case.loss_func,
        case.params,
        [(X1, y1)],
        batch_size_fn=case.batch_size_fn,
        gradient_of="datum",
    )
    torch.testing.assert_close(E, R * torch.outer(g, g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gradient_of", ["datum", "loss-term"])
@pytest.mark.parametrize("name", FISHER_CASES)
def test_ef_matches_separate_forward_passes(name: str, gradient_of: str):
    """EF == Σ_i g_i g_iᵀ / Z with g_i from a separate forward-backward pass per datum (and
    per position of it, for loss terms)."""
    case = make_case(name)
    grads = []
    for X, y in case.data:
        for j in range(y.shape[0]):
            out = _forward(case, _slice(X, j))
            if gradient_of == "datum":
                loss_sum = copy.copy(case.loss_func)
                loss_sum.reduction = "sum"
                grads.append(_grad(loss_sum(out, y[j : j + 1]), case))
                continue
            for term in _term_losses(case.loss_func, out, y[j : j + 1]):
                if term.requires_grad:  # an ignored target's loss is a constant zero
                    grads.append(_grad(term, case, retain_graph=True))
    G = torch.stack(grads)
    E = dense_ef(
        case.model_func,
        case.loss_func,
        case.params,
        case.data,
        batch_size_fn=case.batch_size_fn,
        gradient_of=gradient_of,
    )
    expected = G.T @ G / _normaliser(case.loss_func, case.data)
    torch.testing.assert_close(E, expected, rtol=1e-10, atol=1e-12)


def test_ef_conventions_differ_on_sequences_and_agree_without_positions():
    seq, flat = make_case("seq-ce-mean"), make_case("mlp-ce-mean")
    for case, same in ((seq, False), (flat, True)):
        args = (case.model_func, case.loss_func, case.params, case.data)
        per_term, per_datum = dense_ef(*args), dense_ef(*args, gradient_of="datum")
        assert torch.allclose(per_term, per_datum, rtol=1e-10, atol=1e-12) == same, case.name


def test_jacobian_matches_finite_differences(case: Case):
    """Central differences (float64, eps = 1e-6: truncation ~1e-12, round-off ~1e-10)."""
    J = dense_jacobian(case.model_func, case.params, case.data, batch_size_fn=case.batch_size_fn)
    eps = 1e-6
    columns = []
    with torch.no_grad():
        for p in case.param_list:
            for k in range(p.numel()):
                p.view(-1)[k] += eps
                up = torch.cat([_forward(case, X).reshape(-1) for X, _ in case.data])
                p.view(-1)[k] -= 2 * eps
                down = torch.cat([_forward(case, X).reshape(-1) for X, _ in case.data])
                p.view(-1)[k] += eps
                columns.append((up - down) / (2 * eps))
    torch.testing.assert_close(J, torch.stack(columns, dim=1), rtol=1e-6, atol=1e-7)


# ==================================================================== structural facts
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_equals_hessian_for_model_linear_in_params(loss: str, reduction: str):
    """If f is linear in θ the GGN equals the Hessian (any loss, any batching)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).to(DTYPE)
    X = [torch.randn(n, 4, generator=gen, dtype=DTYPE) for n in (4, 3, 5)]
    if loss == "mse":
        loss_func = nn.MSELoss(reduction=reduction)
        y = [torch.randn(x.shape[0], 3, generator=gen, dtype=DTYPE) for x in X]
    elif loss == "ce":
        loss_func = nn.CrossEntropyLoss(reduction=reduction)
        y = [torch.randint(0, 3, (x.shape[0],), generator=gen) for x in X]
    else:
        loss_func = nn.BCEWithLogitsLoss(reduction=reduction)
        y = [torch.randint(0, 2, (x.shape[0], 3), generator=gen).to(DTYPE) for x in X]
    data = list(zip(X, y))
    params = list(model.parameters())
    H = dense_hessian(model, loss_func, params, data)
    G = dense_ggn(model, loss_func, params, data)
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)
    assert H.abs().max() > 1e-2  # not trivially zero


def test_ggn_differs_from_hessian_for_nonlinear_model():
    """Counterpart of the linear-model test: with a Tanh layer the two must differ."""
    case = make_case("mlp-mse-sum")
    refs = _references(case)
    assert (refs["hessian"] - refs["ggn"]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["hessian", "ggn", "jacobian"])
@pytest.mark.parametrize("name", SAME_SHAPE_CASES)
def test_batching_invariance(name: str, kind: str):
    """Splitting the data into several batches (mean or sum) does not change the matrix."""
    case = make_case(name)
    torch.testing.assert_close(
        _reference(kind, case), _reference(kind, case, _one_batch(case)), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", [n for n in FISHER_CASES if n in SAME_SHAPE_CASES])
def test_batching_invariance_ef(name: str):
    case = make_case(name)
    torch.testing.assert_close(
        _reference("ef", case), _reference("ef", case, _one_batch(case)), rtol=1e-10, atol=1e-12
    )


def test_symmetric_and_psd(case: Case):
    """Hessian, GGN, EF are symmetric; GGN and EF are PSD (eigenvalues >= -1e-10 |λ|max)."""
    refs = _references(case)
    for kind in ("hessian", "ggn", "ef"):
        if kind not in refs:
            continue
        M = refs[kind]
        D = case.dim
        assert M.shape == (D, D), kind
        torch.testing.assert_close(M, M.T, rtol=0, atol=1e-12 * max(1.0, M.abs().max().item()))
        if kind != "hessian":
            eigs = torch.linalg.eigvalsh(M)
            assert eigs.min() >= -1e-10 * max(1.0, eigs.abs().max().item()), kind
    N_out = sum(_forward(case, X).numel() for X, _ in case.data)
    assert refs["jacobian"].shape == (N_out, case.dim)


def test_parameter_subset_and_order():
    """A shuffled parameter subset selects the matching rows/columns of the full matrices."""
    case = make_case("subset-shuffled-ce-mean")
    model = case.model_func
    full_params = list(model.parameters())  # [W0, b0, W1, b1] in module order
    offsets, start = {}, 0
    for p in full_params:
        offsets[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    idx = torch.cat([offsets[id(p)] for p in case.params])
    full = make_case("subset-shuffled-ce-mean")  # same seed: same values
    full.params = list(full.model_func.parameters())
    sub_refs, full_refs = _references(case), _references(full)
    for kind in ("hessian", "ggn", "ef"):
        torch.testing.assert_close(sub_refs[kind], full_refs[kind][idx][:, idx])
    torch.testing.assert_close(sub_refs["jacobian"], full_refs["jacobian"][:, idx])


def test_dict_params_of_module_match_list():
    case = make_case("mlp-ce-mean")
    as_dict = make_case("mlp-ce-mean")
    as_dict.params = dict(as_dict.model_func.named_parameters())
    refs = _references(as_dict)
    for kind, M in _references(case).items():
        torch.testing.assert_close(refs[kind], M, rtol=0, atol=0, msg=kind)


def test_float32_and_device_follow_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen))]
    params = list(model.parameters())
    for fn in (dense_hessian, dense_ggn, dense_ef):
        M = fn(model, nn.MSELoss(), params, data)
        assert M.dtype == torch.float32 and M.device == params[0].device
    J = dense_jacobian(model, params, data)
    assert J.dtype == torch.float32 and J.shape == (10, sum(p.numel() for p in params))


def test_caller_state_is_untouched():
    """No .grad, requires_grad, training-mode, loss-reduction or global-RNG side effects."""
    case = make_case("mlp-bce-mean")
    model = case.model_func
    model.train()  # no dropout/batch-norm: the matrices are still deterministic
    params = case.params
    params[0].grad = torch.ones_like(params[0])
    params[1].requires_grad_(False)
    rng_state = torch.get_rng_state()
    _references(case)
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))
    assert all(p.grad is None for p in params[1:])
    assert [p.requires_grad for p in params] == [True, False, True, True]
    assert model.training
    assert case.loss_func.reduction == "mean"
    assert torch.equal(torch.get_rng_state(), rng_state)


# ==================================================================== block diagonal
def test_dense_block_diagonal():
    M = torch.arange(25, dtype=DTYPE).reshape(5, 5)
    B = dense_block_diagonal(M, [2, 1, 2])
    expected = torch.zeros(5, 5, dtype=DTYPE)
    expected[:2, :2] = M[:2, :2]
    expected[2, 2] = M[2, 2]
    expected[3:, 3:] = M[3:, 3:]
    assert torch.equal(B, expected)
    assert torch.equal(M, torch.arange(25, dtype=DTYPE).reshape(5, 5))  # input unchanged
    assert torch.equal(dense_block_diagonal(M, [5]), M)


@pytest.mark.parametrize(
    "shape, sizes, match",
    [
        ((4, 3), [4], "square matrix"),
        ((4, 4), [2, 1], "sum to the matrix dimension"),
        ((4, 4), [5, -1], "must be positive"),
    ],
)
def test_dense_block_diagonal_errors(shape, sizes, match):
    with pytest.raises(ValueError, match=match):
        dense_block_diagonal(torch.zeros(*shape), sizes)


# ==================================================================== error paths
def _mlp_problem():
    case = make_case("mlp-mse-mean")
    return case.model_func, case.loss_func, case.params, case.data


@pytest.mark.parametrize("fn", [dense_hessian, dense_ggn, dense_ef])
def test_parameter_errors(fn):
    model, loss, params, data = _mlp_problem()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fn(model, loss, [p.clone() for p in params], data)
    with pytest.raises(ValueError, match="params is empty"):
        fn(model, loss, [], data)
    with pytest.raises(TypeError, match="params must be a list"):
        fn(model, loss, params[0], data)
    with pytest.raises(TypeError, match="not a Tensor"):
        fn(model, loss, [params[0], 3.0], data)
    with pytest.raises(TypeError, match="must be floating"):
        fn(model, loss, [torch.zeros(2, dtype=torch.long)], data)
    with pytest.raises(ValueError, match="same tensor twice"):
        fn(model, loss, [params[0], params[0]], data)
    with pytest.raises(ValueError, match="one dtype and device"):
        fn(model, loss, [params[0], torch.zeros(2, dtype=torch.float32)], data)
    with pytest.raises(TypeError, match="model_func must be"):
        fn("not a model", loss, params, data)
    with pytest.raises(TypeError, match="must return a Tensor"):
        fn(lambda ps, X: [X], loss, [torch.zeros(2, dtype=DTYPE)], data)


@pytest.mark.parametrize("fn", [dense_hessian, dense_ggn, dense_ef])
def test_data_and_loss_errors(fn):
    model, loss, params, data = _mlp_problem()
    with pytest.raises(ValueError, match="is not a pair"):
        fn(model, loss, params, [data[0][0]])
    with pytest.raises(ValueError, match="Pass batch_size_fn"):
        fn(model, loss, params, [({"x": data[0][0]}, data[0][1])])
    with pytest.raises(ValueError, match="must be non-empty"):
        fn(model, loss, params, [(data[0][0][:0], data[0][1][:0])])
    with pytest.raises(ValueError, match="data is empty"):
        fn(model, loss, params, [])
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        fn(model, nn.MSELoss(reduction="none"), params, data)
    with pytest.raises(ValueError, match="reduction=None"):
        fn(model, lambda out, y: ((out - y) ** 2).sum(), params, data)


def test_normaliser_is_read_off_pytorch():
    """Padding, class weights and an all-ignored batch: the references average over the
    data's non-ignored (weighted) terms, as one PyTorch loss call on all data would."""
    case = make_case("mlp-ce-weighted-mean")
    X = torch.cat([X for X, _ in case.data])
    y = torch.cat([y for _, y in case.data])
    y[4:6] = -100  # the middle batch is all padding
    batches = [(X[:4], y[:4]), (X[4:6], y[4:6]), (X[6:], y[6:])]
    args = (case.model_func, case.loss_func, case.params)
    for fn in (dense_hessian, dense_ggn):
        torch.testing.assert_close(fn(*args, batches), fn(*args, [(X, y)]), rtol=1e-10, atol=0)


def test_zero_loss_batch_has_no_readable_normaliser():
    model, loss, params, data = _mlp_problem()
    X = data[0][0]
    with torch.no_grad():
        y = model(X)
    with pytest.raises(ValueError, match="the loss is zero"):
        dense_hessian(model, loss, params, [(X, y)])
    with pytest.raises(ValueError, match="Every loss term of the data is ignored"):
        case = make_case("mlp-ce-mean")
        X, y = case.data[0]
        dense_ggn(case.model_func, case.loss_func, case.params, [(X, torch.full_like(y, -100))])


def test_jacobian_data_errors():
    model, _, params, data = _mlp_problem()
    with pytest.raises(ValueError, match="Pass batch_size_fn"):
        dense_jacobian(model, params, [({"x": data[0][0]}, data[0][1])])
    with pytest.raises(ValueError, match="data is empty"):
        dense_jacobian(model, params, [])


def test_ef_errors():
    case = make_case("custom-quartic-mean")
    with pytest.raises(ValueError, match="knows the loss terms of"):
        dense_ef(case.model_func, case.loss_func, case.params, case.data)
    with pytest.raises(ValueError, match="gradient_of must be one of"):
        dense_ef(case.model_func, case.loss_func, case.params, case.data, gradient_of="token")
    model, loss, params, data = _mlp_problem()
    with pytest.raises(ValueError, match="the data on the output's leading axis"):
        dense_ef(lambda ps, X: ps[0] * X.sum(), loss, [params[0]], data)
    # 1-d output: cross-entropy would read it as one unbatched datum with N classes
    w = torch.randn(3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    X = data[0][0]
    y = torch.softmax(torch.ones(X.shape[0], dtype=DTYPE), dim=0)
    with pytest.raises(ValueError, match="CrossEntropyLoss needs outputs"):
        dense_ef(lambda ps, X: X @ ps[0], nn.CrossEntropyLoss(), [w], [(X, y)])


@pytest.mark.parametrize("layer", ["layernorm", "weight_norm", "weight_norm_whole"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_hessian_matches_finite_differences(loss: str, layer: str):
    """NOTE [dense Hessian]: torch.func's Hessian through nn.LayerNorm was off by 0.31, and
    PyTorch's second derivative of the fused weight norm is wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    if layer != "layernorm":
        model[1] = nn.Identity()
        dim = 0 if layer == "weight_norm" else None
        torch.nn.utils.parametrizations.weight_norm(model[0], dim=dim)
    X = torch.randn(5, 3, dtype=DTYPE)
    y = torch.randn(5, 3, dtype=DTYPE) if loss == "mse" else torch.randint(0, 3, (5,))
    loss_func = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    params = list(model.parameters())
    H = dense_hessian(model, loss_func, params, [(X, y)])

    names = [n for n, _ in model.named_parameters()]
    theta = _flat(params).detach()

    def gradient(t: Tensor) -> Tensor:
        t = t.clone().requires_grad_(True)
        values = [v.view_as(p) for v, p in zip(t.split([p.numel() for p in params]), params)]
        out = torch.func.functional_call(model, dict(zip(names, values)), (X,))
        return torch.autograd.grad(loss_func(out, y), t)[0]

    eps = 1e-5
    basis = torch.eye(theta.numel(), dtype=DTYPE)
    fd = torch.stack(
        [(gradient(theta + eps * e) - gradient(theta - eps * e)) / (2 * eps) for e in basis]
    )
    torch.testing.assert_close(H, fd, rtol=1e-6, atol=1e-7)
