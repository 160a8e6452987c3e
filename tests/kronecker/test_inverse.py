"""Damped inverses of KFAC and EKFAC against dense inverses of dense damped operators.

Factor-wise and heuristic damping must not eigendecompose (NOTE [Cholesky inverse factors] of
``curvops.kronecker.inverse``): their tests run with ``torch.linalg.eigh`` made to fail, except
for the structured form ``to_block_diagonal()``, which needs the eigendecompositions.
"""

from __future__ import annotations

from math import sqrt

import pytest
import torch
from helpers.kronecker_problems import (
    DTYPE,
    batches,
    build,
    eigh_failing_below_float64,
    generator,
)
from torch import nn

from curvops.kronecker import (
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvops.kronecker.product import MatrixBlock
from curvops.testing import assert_operator_matches

N, T = 12, 3


class Mixed(nn.Module):
    """Embedding (diagonal input factor), joint/separate linear blocks, a LayerNorm fallback."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(self.norm(torch.tanh(self.lin(self.emb(ids)))))


def mixed_problem():
    model = build(Mixed)
    g = generator(1)
    ids = torch.randint(0, 5, (N, T), generator=g)
    data = batches(ids, torch.randn(N, T, 2, generator=g, dtype=DTYPE))
    params = list(model.parameters())
    order = torch.randperm(len(params), generator=generator(2)).tolist()
    return model, [params[i] for i in order], data


def make_kfac(separate: bool = True, cls=KFACLinearOperator, **kwargs) -> KFACLinearOperator:
    model, params, data = mixed_problem()
    options = {"fisher_type": "type-2", "fallback": "diagonal"} | kwargs
    return cls(model, nn.MSELoss(), params, data, separate_weight_and_bias=separate, **options)


def damped_kfac_dense(
    K: KFACLinearOperator, dampings: dict[str, tuple[float, float]], shift: float
):
    """Dense KFAC with factors replaced by (A + dA I, B + dB I) per layer, fallback diag + shift."""
    state = K.state_dict()
    for name, tensors in state["factors"].items():
        dA, dB = dampings[name]
        B = tensors["gradient_factor"]
        tensors["gradient_factor"] = B + dB * torch.eye(B.shape[0], dtype=DTYPE)
        if "input_factor" in tensors:
            A = tensors["input_factor"]
            tensors["input_factor"] = (
                A + dA if A.ndim == 1 else A + dA * torch.eye(A.shape[0], dtype=DTYPE)
            )
        if "bias_input_factor" in tensors:
            tensors["bias_input_factor"] = tensors["bias_input_factor"] + dA
    state["fallback_diagonals"] = {k: v + shift for k, v in state["fallback_diagonals"].items()}
    damped = make_kfac(separate=state["config"]["separate_weight_and_bias"])
    damped.load_state_dict(state)
    return damped.to_dense()


def _forbid_eigh(monkeypatch):
    """Make every symmetric eigendecomposition fail (undo with ``monkeypatch.undo()``)."""

    def eigh(*args, **kwargs):
        raise AssertionError("torch.linalg.eigh was called")

    monkeypatch.setattr(torch.linalg, "eigh", eigh)


@pytest.mark.parametrize("damping", [0.1, (0.05, 0.3)], ids=["float", "pair"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_factor_damping(separate, damping, monkeypatch):
    K = make_kfac(separate)
    dA, dB = (damping, damping) if isinstance(damping, float) else damping
    dense = damped_kfac_dense(K, {name: (dA, dB) for name in K.factors}, shift=dA * dB)
    reference = torch.linalg.inv(dense)
    _forbid_eigh(monkeypatch)
    K_inv = KFACInverseLinearOperator(K, damping=damping)
    assert_operator_matches(K_inv, reference, rtol=1e-7, atol=1e-9)
    assert K._eigen_cache == {}
    monkeypatch.undo()
    assert_operator_matches(K_inv.to_block_diagonal(), reference, rtol=1e-7, atol=1e-9)
    assert K_inv.to_block_diagonal() is K_inv.to_block_diagonal()  # built once


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_exact_damping(separate):
    K = make_kfac(separate)
    K_inv = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    dense = K.to_dense() + 0.1 * torch.eye(K.shape[0], dtype=DTYPE)
    assert_operator_matches(K_inv, torch.linalg.inv(dense), rtol=1e-7, atol=1e-9)


def heuristic_pair(A, B, delta, min_damping):
    mean_A = A.mean() if A.ndim == 1 else A.diagonal().mean()
    pi = sqrt(float(mean_A) / float(B.diagonal().mean()))
    return max(pi * sqrt(delta), min_damping), max(sqrt(delta) / pi, min_damping)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_heuristic_damping(separate, monkeypatch):
    """Martens & Grosse (2015), §6.3, computed here directly from the factors."""
    K = make_kfac(separate)
    delta, min_damping = 0.01, 0.05
    _forbid_eigh(monkeypatch)
    K_inv = KFACInverseLinearOperator(
        K, damping=delta, use_heuristic_damping=True, min_damping=min_damping
    )
    monkeypatch.undo()
    dampings = {}
    for name, f in K.factors.items():
        # joint and weight blocks: (A, B); a separate bias block has its own pi with A = a_b
        A = f.input_factor
        dampings[name] = heuristic_pair(A, f.gradient_factor, delta, min_damping)
        assert f.bias_input_factor is None or separate
    # separate bias blocks get their own pi (A = a_b); they are overwritten below
    dense = damped_kfac_dense(K, dampings, shift=delta)
    reference = torch.linalg.inv(dense)
    if separate:
        for f in K.factors.values():
            if f.bias_input_factor is None:
                continue
            a_b = f.bias_input_factor.reshape(1, 1)
            dA, dB = heuristic_pair(a_b, f.gradient_factor, delta, min_damping)
            B = f.gradient_factor + dB * torch.eye(f.gradient_factor.shape[0], dtype=DTYPE)
            block = torch.linalg.inv((a_b + dA) * B)
            i = K.param_names.index(f.bias_name)
            start = sum(torch.Size(s).numel() for s in K.in_shapes[:i])
            idx = torch.arange(start, start + block.shape[0])
            reference[idx[:, None], idx[None, :]] = block
    _forbid_eigh(monkeypatch)
    assert_operator_matches(K_inv, reference, rtol=1e-7, atol=1e-9)
    monkeypatch.undo()
    assert_operator_matches(K_inv.to_block_diagonal(), reference, rtol=1e-7, atol=1e-9)


def test_heuristic_damping_is_clipped_at_min_damping():
    K = make_kfac()
    clipped = KFACInverseLinearOperator(K, damping=0.0, use_heuristic_damping=True, min_damping=0.2)
    pair = KFACInverseLinearOperator(K, damping=(0.2, 0.2))
    # identical except the fallback block (shift 0 for heuristic vs 0.04 for the pair)
    v = torch.randn(K.shape[0], generator=generator(3), dtype=DTYPE)
    fallback = [i for i, n in enumerate(K.param_names) if n.startswith("norm.")]
    keep = torch.ones(K.shape[0], dtype=torch.bool)
    for i in fallback:
        start = sum(torch.Size(s).numel() for s in K.in_shapes[:i])
        keep[start : start + torch.Size(K.in_shapes[i]).numel()] = False
    torch.testing.assert_close((clipped @ v)[keep], (pair @ v)[keep])


def test_ekfac_inverse():
    EK = make_kfac(separate=False, cls=EKFACLinearOperator)
    EK_inv = EKFACInverseLinearOperator(EK, damping=0.05)
    dense = EK.to_dense() + 0.05 * torch.eye(EK.shape[0], dtype=DTYPE)
    assert_operator_matches(EK_inv, torch.linalg.inv(dense), rtol=1e-7, atol=1e-9)


def test_zero_damping_inverts_nonsingular_kfac():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)))
    g = generator(4)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE), torch.randn(N, 4, generator=g, dtype=DTYPE)
    )
    K = KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, fisher_type="type-2"
    )
    K_inv = KFACInverseLinearOperator(K)
    assert_operator_matches(K_inv, torch.linalg.inv(K.to_dense()), rtol=1e-6, atol=1e-8)


def test_singular_block_without_damping_is_an_error_naming_the_layer():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))  # B of layer 0: rank 2
    g = generator(5)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE), torch.randn(N, 2, generator=g, dtype=DTYPE)
    )
    K = KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, fisher_type="type-2"
    )
    with pytest.raises(ValueError, match="Linear '0' is singular"):
        KFACInverseLinearOperator(K, use_exact_damping=True)


@pytest.mark.parametrize("use_cache", [False, True], ids=["cholesky", "eigen"])
def test_inverse_factors_are_exactly_symmetric(use_cache):
    """The products use the inverse factors untransposed (NOTE [Cholesky inverse factors])."""
    K = make_kfac(separate=False)
    if use_cache:
        KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    K_inv = KFACInverseLinearOperator(K, damping=(0.05, 0.3))
    matrices = [
        side
        for block in K_inv._product.blocks
        if isinstance(block, MatrixBlock)
        for side in (block.core.left, block.core.right)
        if side is not None and side.ndim == 2
    ]
    assert len(matrices) == 2 * len(K.factors) - 1  # the embedding's input factor is diagonal
    for M in matrices:
        assert torch.equal(M, M.T)


def test_eigendecompositions_are_cached():
    K = make_kfac()
    KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    cached = dict(K._eigen_cache)
    assert len(cached) == 2 * len(K.factors) - 1  # the embedding's input factor is diagonal
    KFACInverseLinearOperator(K, damping=0.2, use_exact_damping=True)
    KFACInverseLinearOperator(K, damping=0.2).to_block_diagonal()
    assert K._eigen_cache.keys() == cached.keys()
    assert all(K._eigen_cache[key] is value for key, value in cached.items())


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_factor_damping_uses_cached_eigendecompositions(separate, monkeypatch):
    """With the eigendecompositions cached, the inverse factors come from them."""
    K = make_kfac(separate)
    damping = (0.05, 0.3)
    reference = torch.linalg.inv(
        damped_kfac_dense(K, {name: damping for name in K.factors}, shift=0.05 * 0.3)
    )
    KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)  # fills the cache

    def cholesky_ex(*args, **kwargs):
        raise AssertionError("torch.linalg.cholesky_ex was called")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", cholesky_ex)
    K_inv = KFACInverseLinearOperator(K, damping=damping)
    assert_operator_matches(K_inv, reference, rtol=1e-7, atol=1e-9)


def test_structured_form_keeps_the_factors_of_construction():
    """to_block_diagonal() (built lazily) describes the operator, even if K's factors change."""
    K = make_kfac()
    K_inv = KFACInverseLinearOperator(K, damping=(0.05, 0.3))
    v = torch.randn(K.shape[0], generator=generator(6), dtype=DTYPE)
    before = K_inv @ v
    state = K.state_dict()
    for tensors in state["factors"].values():
        tensors["gradient_factor"] = 2 * tensors["gradient_factor"]
    K.load_state_dict(state)  # replaces the factors and drops the cache
    torch.testing.assert_close(K_inv.to_block_diagonal() @ v, before, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(K_inv @ v, before, rtol=0, atol=0)


def _rank_deficient_kfac(dtype=DTYPE) -> KFACLinearOperator:
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).to(dtype)
    g = generator(5)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE).to(dtype),
        torch.randn(N, 2, generator=g, dtype=DTYPE).to(dtype),
    )
    return KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, fisher_type="type-2"
    )  # the gradient factor B of layer '0' has rank 2 < 4


def _spy_eigendecompositions(K, monkeypatch) -> list[tuple[str, str]]:
    calls = []
    original = K.eigendecomposition

    def eigendecomposition(layer_name, factor, **kwargs):
        calls.append((layer_name, factor))
        return original(layer_name, factor, **kwargs)

    monkeypatch.setattr(K, "eigendecomposition", eigendecomposition)
    return calls


@pytest.mark.parametrize("damping", [0.0, (1.0, 0.0)], ids=["float", "pair"])
def test_singular_factor_without_damping_is_an_error_naming_the_layer(damping, monkeypatch):
    """The Cholesky factorisation of a singular factor falls back to the eigendecomposition."""
    K = _rank_deficient_kfac()
    calls = _spy_eigendecompositions(K, monkeypatch)
    with pytest.raises(ValueError, match="gradient factor of Linear '0' is singular"):
        KFACInverseLinearOperator(K, damping=damping)
    assert ("0", "gradient") in calls and ("0", "input") not in calls


def test_retry_option_reaches_the_fallback_decomposition(monkeypatch):
    """A float32 singular factor falls back to eigh, which is retried in float64 if asked."""
    K = _rank_deficient_kfac(torch.float32)
    K.compute_factors()
    eigh_failing_below_float64(monkeypatch)
    with pytest.raises(RuntimeError, match=r"gradient factor of Linear '0' \(torch.float32\)"):
        KFACInverseLinearOperator(K, damping=0.0, retry_double_precision=False)
    with pytest.raises(ValueError, match="gradient factor of Linear '0' is singular"):
        KFACInverseLinearOperator(K, damping=0.0)


def test_slightly_indefinite_factor_with_tiny_damping_gives_finite_psd_inverse(monkeypatch):
    """An eigenvalue of round-off size (here negative) is clipped to 0 (NOTE [numerical rank
    of factors]), so the inverse factor is Q diag(1 / (max(lambda, 0) + delta)) Q^T."""
    model = build(lambda: nn.Linear(3, 4, bias=False))
    g = generator(7)
    data = batches(
        torch.randn(N, 3, generator=g, dtype=DTYPE), torch.randn(N, 4, generator=g, dtype=DTYPE)
    )
    K = KFACLinearOperator(model, nn.MSELoss(), [model.weight], data, fisher_type="type-2")
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DTYPE))[0].contiguous()
    lam = torch.tensor([-1e-13, 100.0, 200.0, 300.0], dtype=DTYPE)
    state = K.state_dict()
    (tensors,) = state["factors"].values()
    tensors["gradient_factor"] = (Q * lam) @ Q.T
    K.load_state_dict(state)
    delta = 1e-13
    calls = _spy_eigendecompositions(K, monkeypatch)
    K_inv = KFACInverseLinearOperator(K, damping=delta)
    assert calls == [("", "gradient")]  # the input factor A is well conditioned
    dense = K_inv.to_dense()
    B_inv = (Q / (lam.clamp(min=0) + delta)) @ Q.T
    A = tensors["input_factor"]
    A_inv = torch.linalg.inv(A + delta * torch.eye(3, dtype=DTYPE))
    reference = torch.kron(B_inv.contiguous(), A_inv.contiguous())  # kron rejects column-major
    assert bool(torch.isfinite(dense).all())
    scale = float(reference.abs().max())  # about 1 / delta
    torch.testing.assert_close(dense, reference, rtol=1e-6, atol=1e-6 * scale)
    assert float(torch.linalg.eigvalsh(dense).min()) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damping": -1.0}, "damping must be a non-negative number"),
        ({"damping": (0.1,)}, "must be a pair"),
        ({"damping": (0.1, -0.1)}, r"damping\[1\] must be a non-negative"),
        (
            {"damping": 0.1, "use_heuristic_damping": True, "use_exact_damping": True},
            "exclude each other",
        ),
        ({"damping": (0.1, 0.1), "use_exact_damping": True}, "take one float damping"),
        ({"damping": 0.1, "min_damping": -1}, "min_damping must be"),
    ],
)
def test_bad_damping_options(kwargs, match):
    K = make_kfac(check_deterministic=False)
    with pytest.raises(ValueError, match=match):
        KFACInverseLinearOperator(K, **kwargs)


def test_wrong_operator_types():
    K = make_kfac(check_deterministic=False)
    EK = make_kfac(cls=EKFACLinearOperator, check_deterministic=False)
    with pytest.raises(TypeError, match="use EKFACInverseLinearOperator"):
        KFACInverseLinearOperator(EK)
    with pytest.raises(TypeError, match="use KFACInverseLinearOperator"):
        EKFACInverseLinearOperator(K)
    with pytest.raises(ValueError, match="damping must be a non-negative"):
        EKFACInverseLinearOperator(EK, damping=-0.1)
