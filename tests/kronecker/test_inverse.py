"""Damped inverses of KFAC and EKFAC against dense inverses of dense damped operators."""

from __future__ import annotations

from math import sqrt

import pytest
import torch
from helpers.kronecker_problems import DTYPE, batches, build, generator
from torch import nn

from curvops.kronecker import (
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
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


@pytest.mark.parametrize("damping", [0.1, (0.05, 0.3)], ids=["float", "pair"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_factor_damping(separate, damping):
    K = make_kfac(separate)
    dA, dB = (damping, damping) if isinstance(damping, float) else damping
    K_inv = KFACInverseLinearOperator(K, damping=damping)
    dense = damped_kfac_dense(K, {name: (dA, dB) for name in K.factors}, shift=dA * dB)
    assert_operator_matches(K_inv, torch.linalg.inv(dense), rtol=1e-7, atol=1e-9)


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
def test_heuristic_damping(separate):
    """Martens & Grosse (2015), §6.3, computed here directly from the factors."""
    K = make_kfac(separate)
    delta, min_damping = 0.01, 0.05
    K_inv = KFACInverseLinearOperator(
        K, damping=delta, use_heuristic_damping=True, min_damping=min_damping
    )
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
    assert_operator_matches(K_inv, reference, rtol=1e-7, atol=1e-9)


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


def test_factorisations_are_cached():
    K = make_kfac()
    KFACInverseLinearOperator(K, damping=0.1)
    cached = dict(K._eigen_cache)
    KFACInverseLinearOperator(K, damping=0.2, use_exact_damping=True)
    assert all(K._eigen_cache[key] is value for key, value in cached.items())


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
